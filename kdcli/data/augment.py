"""Batched augmentation and normalization of uint8 images, on whatever device the batch lives.

torchvision.transforms.v2 draws one set of random parameters per call, i.e. the
same crop, flip or angle for a whole batch; per-sample draws are what the
CIFAR recipes mean (they transform one PIL image at a time), so the random
crop, flip and rotation here are written as batched tensor ops instead. All
geometric steps work on uint8 pixels and fill with 0 before normalization,
as torchvision's RandomCrop(padding=p) and RandomRotation do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel: the evaluation transform."""
    images = TF.to_dtype(images_uint8, torch.float32, scale=True)
    return TF.normalize(images, mean=list(mean), std=list(std))


def crop_padded(images: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Per-sample crop of the zero-padded batch: sample i is cut at ``(top[i], left[i])`` of its padded image.

    Offsets range over ``[0, 2 * padding]``; the output keeps the input's H x W.
    """
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (top.unsqueeze(1) + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (left.unsqueeze(1) + torch.arange(width, device=images.device))[:, None, None, :]
    samples = torch.arange(len(images), device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate sample i by ``degrees[i]`` counter-clockwise about its center.

    Nearest-neighbour sampling and zero fill, as torchvision's RandomRotation
    defaults; nearest sampling copies pixels, so uint8 in gives uint8 out.
    """
    height, width = images.shape[-2:]
    radians = torch.deg2rad(degrees.float())
    cos, sin = radians.cos(), radians.sin()
    # Output pixel -> input pixel in affine_grid's [-1, 1] coordinates; the H/W
    # factors undo the different scaling of x and y on non-square images.
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    rotated = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return rotated.to(images.dtype)


class BatchAugment(torch.nn.Module):
    """Random crop, horizontal flip and rotation drawn per sample, then normalization.

    ``forward`` takes a uint8 [B, C, H, W] batch and returns float32 of the same
    shape on the same device. Random numbers come from ``generator`` (drawn on
    the generator's device, so a CPU generator gives the same augmentation for
    a batch on any device) or from the global RNG when it is ``None``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int,
        hflip: bool,
        rotation: float = 0.0,
    ) -> None:
        super().__init__()
        if crop_padding < 0 or rotation < 0:
            raise ValueError(f"crop_padding and rotation must be >= 0, got {crop_padding} and {rotation}")
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.rotation = rotation

    def forward(self, images_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {images_uint8.dtype}")
        images = images_uint8
        batch = len(images)
        if self.crop_padding > 0:
            top, left = _uniform_ints(2 * self.crop_padding + 1, (2, batch), generator, images.device)
            images = crop_padded(images, self.crop_padding, top, left)
        if self.hflip:
            flip = _uniform(batch, generator, images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.rotation > 0:
            degrees = (2 * _uniform(batch, generator, images.device) - 1) * self.rotation
            images = rotate(images, degrees)
        return normalize(images, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"crop_padding={self.crop_padding}, hflip={self.hflip}, rotation={self.rotation}"


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return device if generator is None else generator.device


def _uniform(size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(size, generator=generator, device=_draw_device(generator, device)).to(device)


def _uniform_ints(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)
