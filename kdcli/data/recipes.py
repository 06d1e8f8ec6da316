"""The timm/torchvision ImageNet recipes for images decoded one file at a time (the streaming path).

Training: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal
flip, optionally TrivialAugment or RandAugment, all torchvision.transforms.v2.
Evaluation: resize the short side to ``size / crop_pct``, then a center crop.

A training view is replayable: the transform runs under a generator state
seeded from (seed, epoch, sample index) alone, so sample i of epoch e looks
the same whatever the worker, batch size or number of processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

AutoAugment = Literal["none", "trivial", "rand"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, epoch, index) only."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class EvalView:
    """What evaluation and validation see: resize to ``size / crop_pct``, center crop ``size``."""

    size: int
    crop_pct: float = 0.875

    def transform(self) -> v2.Compose:
        return v2.Compose([v2.Resize(round(self.size / self.crop_pct), antialias=True), v2.CenterCrop(self.size), v2.PILToTensor()])


@dataclass(frozen=True)
class TrainRecipe:
    """The per-sample training view of a streamed image, and the normalization after it."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    auto_augment: AutoAugment = "none"

    @property
    def is_random(self) -> bool:
        return True  # the crop is drawn per sample

    def facts(self) -> dict[str, Any]:
        """What a view depends on besides (seed, epoch, index): part of a teacher cache's key."""
        return {"size": self.size, "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip, "auto_augment": self.auto_augment}

    def transform(self) -> v2.Compose:
        steps: list[Any] = [v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True)]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.auto_augment == "trivial":
            steps.append(v2.TrivialAugmentWide())
        elif self.auto_augment == "rand":
            steps.append(v2.RandAugment())
        return v2.Compose([*steps, v2.PILToTensor()])


def replayable(transform: v2.Compose, image: Image.Image, seed: int) -> Tensor:
    """``transform(image)`` with torch's generator seeded by ``seed``, leaving the caller's generator as it was."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone, the one v2 draws from: torch.manual_seed also seeds every accelerator's
        # generator, 0.19 ms a sample (4 % of a streamed image's decode and crop).
        torch.default_generator.manual_seed(seed)
        return transform(image)
