"""Batched augmentation and normalization of uint8 images, on whatever device the batch lives.

torchvision.transforms.v2 draws one set of random parameters per call, i.e. the
same crop, flip or angle for a whole batch; per-sample draws are what the
CIFAR recipes mean (they transform one PIL image at a time), so the random
crop, flip and rotation here are written as batched tensor ops instead. All
geometric steps work on uint8 pixels and fill with 0 before normalization,
as torchvision's RandomCrop(padding=p) and RandomRotation do.

Drawing and applying are separate (``BatchAugment.draw`` / ``apply``), so a
training epoch can draw every sample's parameters up front from a seed and
index them by the batch's sample positions (``EpochAugmentation``): the
augmented view of sample i then depends on (seed, i) only, not on batch size,
order or the number of processes, and can be replayed (teacher-output caching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel: the evaluation transform.

    The same operations, in the same order, as torchvision's ``to_dtype(scale=True)``
    followed by ``normalize`` (so bit for bit the same result), done in place on
    the one new float tensor instead of through torchvision's per-call checks.
    """
    if images_uint8.dtype != torch.uint8:  # float input would be rescaled, and modified in place
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    images = images_uint8.to(torch.float32)
    return images.mul_(1.0 / 255).sub_(_channel_column(tuple(mean), images.device)).div_(_channel_column(tuple(std), images.device))


@lru_cache(maxsize=32)
def _channel_column(values: tuple[float, ...], device: torch.device) -> Tensor:
    # Built once per (values, device): no host-to-device copy per batch. Never modified in place.
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def crop_flip(images: Tensor, padding: int, top: Tensor | None, left: Tensor | None, flip: Tensor | None) -> Tensor:
    """Per-sample crop of the zero-padded batch, then a per-sample horizontal flip, as one gather.

    Sample i is cut at ``(top[i], left[i])`` of its padded image (offsets in
    ``[0, 2 * padding]``; ``None`` = ``padding``, i.e. no shift) and mirrored
    where ``flip[i]``. The flip only reverses the crop's column index, so both
    steps cost one ``torch.gather`` over a flat per-sample pixel index.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    padded_width = width + 2 * padding
    columns = torch.arange(width, device=images.device).expand(batch, width)
    if flip is not None:
        columns = torch.where(flip.unsqueeze(1), width - 1 - columns, columns)
    columns = columns + (padding if left is None else left.unsqueeze(1))
    rows = torch.arange(height, device=images.device).expand(batch, height)
    rows = rows + (padding if top is None else top.unsqueeze(1))
    pixel = (rows * padded_width).unsqueeze(2) + columns.unsqueeze(1)  # [B, H, W] into the padded plane
    index = pixel.view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.flatten(2).gather(2, index).view(batch, channels, height, width)


def crop_padded(images: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Per-sample crop of the zero-padded batch: sample i is cut at ``(top[i], left[i])`` of its padded image.

    Offsets range over ``[0, 2 * padding]``; the output keeps the input's H x W.
    """
    return crop_flip(images, padding, top, left, None)


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


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random draws (row i belongs to sample i); ``None`` where that step is off."""

    top: Tensor | None = None  # int64 crop offsets in [0, 2 * padding]
    left: Tensor | None = None
    flip: Tensor | None = None  # bool
    degrees: Tensor | None = None  # float32 rotation angles

    def select(self, index: Tensor) -> AugmentParams:
        """The rows at ``index``: the draws of those samples."""
        return AugmentParams(*(None if part is None else part[index] for part in self._parts()))

    def to(self, device: torch.device) -> AugmentParams:
        return AugmentParams(*(None if part is None else part.to(device) for part in self._parts()))

    def _parts(self) -> tuple[Tensor | None, ...]:
        return self.top, self.left, self.flip, self.degrees


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

    @property
    def is_random(self) -> bool:
        """Whether any step draws random numbers (else augmenting is normalizing)."""
        return self.crop_padding > 0 or self.hflip or self.rotation > 0

    def draw(self, count: int, generator: torch.Generator | None, device: torch.device) -> AugmentParams:
        """Random parameters for ``count`` samples, returned on ``device``."""
        top = left = flip = degrees = None
        if self.crop_padding > 0:
            top, left = _uniform_ints(2 * self.crop_padding + 1, (2, count), generator, device)
        if self.hflip:
            flip = _uniform(count, generator, device) < 0.5
        if self.rotation > 0:
            degrees = (2 * _uniform(count, generator, device) - 1) * self.rotation
        return AugmentParams(top, left, flip, degrees)

    def apply(self, images_uint8: Tensor, params: AugmentParams) -> Tensor:
        """Augment and normalize ``images_uint8`` with the given per-sample draws."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {images_uint8.dtype}")
        images = images_uint8
        if params.top is not None or params.flip is not None:
            images = crop_flip(images, self.crop_padding, params.top, params.left, params.flip)
        if params.degrees is not None:
            images = rotate(images, params.degrees)
        return normalize(images, self.mean, self.std)

    def forward(self, images_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(images_uint8, self.draw(len(images_uint8), generator, images_uint8.device))

    def facts(self) -> dict[str, Any]:
        """What a view depends on besides (seed, epoch, index): part of a teacher cache's key."""
        return {"crop_padding": self.crop_padding, "hflip": self.hflip, "rotation": self.rotation}

    def extra_repr(self) -> str:
        return f"crop_padding={self.crop_padding}, hflip={self.hflip}, rotation={self.rotation}"


class EpochAugmentation:
    """One epoch's augmentation of a split, replayable: sample i's view depends on (seed, i) only.

    Every sample's parameters are drawn once from a CPU generator seeded with
    ``seed`` (so the same on every device and process) and a batch picks its rows
    by the samples' positions ``index`` in the split.
    """

    def __init__(self, augment: BatchAugment, num_samples: int, seed: int, device: torch.device) -> None:
        self.augment = augment
        generator = torch.Generator().manual_seed(seed)
        self.params = augment.draw(num_samples, generator, torch.device("cpu")).to(device)

    def __call__(self, images_uint8: Tensor, index: Tensor) -> Tensor:
        return self.augment.apply(images_uint8, self.params.select(index))


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return device if generator is None else generator.device


def _uniform(size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(size, generator=generator, device=_draw_device(generator, device)).to(device)


def _uniform_ints(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)
