"""In-memory data sets: uint8 image tensors, their labels, and the recipe defaults that go with them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcli.data.recipes import TrainRecipe
from kdcli.data.stream import FileSplit
from kdcli.errors import UsageError


@dataclass(frozen=True)
class ImageSplit:
    """One split of a data set, held whole in memory.

    ``p_star`` is the true label distribution of every input, known only for
    generated data (the synthetic set); real data sets leave it ``None``.
    """

    images: Tensor  # uint8 [N, C, H, W]
    targets: Tensor  # int64 [N]
    p_star: Tensor | None = None  # float32 [N, num_classes]

    def __post_init__(self) -> None:
        count = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = list(self.images.shape)
            raise ValueError(f"images must be uint8 [N, C, H, W], not {self.images.dtype} {shape}")
        if self.targets.shape != (count,):
            raise ValueError(f"targets must have shape [{count}], not {list(self.targets.shape)}")
        if self.p_star is not None and len(self.p_star) != count:
            raise ValueError(f"p_star has {len(self.p_star)} rows for {count} images")

    def __len__(self) -> int:
        return len(self.targets)

    def digest(self) -> str:
        """Pixels and labels, hashed: what a teacher's outputs on this split are a function of."""
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (self.images, self.targets):
            digest.update(tensor.contiguous().numpy().data)
        return digest.hexdigest()

    def subset(self, index: Tensor) -> ImageSplit:
        """The samples at ``index`` (int64 positions), in that order."""
        p_star = None if self.p_star is None else self.p_star[index]
        return ImageSplit(self.images[index], self.targets[index], p_star)


@dataclass(frozen=True)
class DataRequest:
    """What a data-set entry point is asked for: plain values, not the run's config.

    ``argument`` is what follows the colon in ``NAME:ARG``; ``synthetic`` holds
    the embedded data set's generator settings.
    """

    argument: str | None = None
    root: Path = Path("data")
    download: bool = False
    image_size: int = 64
    synthetic: dict[str, Any] = field(default_factory=dict)
    val_split: float = 0.1  # the run's validation fraction and split seed (see split_train_val)
    split_seed: int = 0
    streaming: dict[str, Any] = field(default_factory=dict)  # the streaming path's settings (in_memory, workers, ...)


@dataclass(frozen=True)
class DataBundle:
    """A data set ready for training: both splits plus what a recipe needs to know about them."""

    name: str  # e.g. "synthetic", "cifar100", "imagefolder"
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, in the [0, 1] pixel scale
    std: tuple[float, ...]
    train: ImageSplit | FileSplit
    test: ImageSplit | FileSplit
    crop_padding: int  # recipe default for random-crop padding; 0 = no crop
    hflip: bool  # recipe default for random horizontal flips
    recipe: TrainRecipe | None = None  # a streamed set's training view (its splits are FileSplits); None: in memory
    unreadable: tuple[str, ...] = ()  # training files left out because they do not decode (in memory)
    notes: tuple[str, ...] = ()  # one-line notes for the user about settings the data set adjusted


def split_train_val(split: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit | None]:
    """Carve a validation split of ``round(fraction * N)`` random samples out of ``split``.

    The two parts are disjoint, depend only on ``seed``, and keep the original
    order within each part. ``fraction == 0`` returns ``(split, None)``.
    """
    if fraction == 0.0:
        return split, None
    train_index, val_index = holdout_index(len(split), fraction, seed)
    return split.subset(train_index), split.subset(val_index)


def holdout_index(count: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train_index, val_index)``: the sorted positions ``split_train_val`` puts in each part."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"validation fraction must be in [0, 1), got {fraction}")
    num_val = round(fraction * count)
    if not 0 < num_val < count:
        raise UsageError(f"validation fraction {fraction} of {count} samples leaves an empty split")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[num_val:].sort().values, order[:num_val].sort().values
