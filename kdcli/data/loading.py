"""Batches of any split, in memory or streamed, and the augmented training batches of an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from kdcli.data.augment import BatchAugment, EpochAugmentation, normalize
from kdcli.data.bundle import ImageSplit
from kdcli.data.loader import BatchLoader
from kdcli.data.recipes import TrainRecipe
from kdcli.data.stream import FileSplit, StreamingLoader
from kdcli.seeds import augmentation_seed

Split = ImageSplit | FileSplit
Augment = BatchAugment | TrainRecipe


def split_loader(
    split: Split, *, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0, num_replicas: int = 1, rank: int = 0
) -> BatchLoader | StreamingLoader:
    """``(images_uint8, targets, index)`` batches of ``split`` on ``device``: evaluation views, no augmentation."""
    loader = StreamingLoader if isinstance(split, FileSplit) else BatchLoader
    return loader(split, batch_size=batch_size, shuffle=shuffle, device=device, seed=seed, num_replicas=num_replicas, rank=rank)


class EpochBatches(Protocol):
    """A training split's batches, epoch by epoch: normalized inputs on the device, targets, sample index."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...

    def epoch_stats(self) -> dict[str, int]: ...


class InMemoryEpochs:
    """The whole split on the device; each epoch's views drawn up front from (seed, epoch) and picked by index."""

    def __init__(self, loader: BatchLoader, augment: BatchAugment, num_samples: int, seed: int) -> None:
        self.loader, self.augment, self.num_samples, self.seed = loader, augment, num_samples, seed

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self.loader.set_epoch(epoch)
        augmentation = EpochAugmentation(self.augment, self.num_samples, augmentation_seed(self.seed, epoch), self.loader.device)
        for images, targets, index in itertools.islice(self.loader, start, None):
            yield augmentation(images, index), targets, index

    def epoch_stats(self) -> dict[str, int]:
        return {}


class StreamedEpochs:
    """Files decoded and augmented in workers (a view per (seed, epoch, index)), normalized on the device."""

    def __init__(self, loader: StreamingLoader, recipe: TrainRecipe) -> None:
        self.loader, self.recipe = loader, recipe
        self.skipped_before = 0

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self.loader.set_epoch(epoch)
        self.skipped_before = self.loader.skipped
        skip = self.loader.split.on_corrupt == "skip"
        for images, targets, index in self.loader.iterate(start, skip_corrupt=skip):
            yield normalize(images, self.recipe.mean, self.recipe.std), targets, index

    def epoch_stats(self) -> dict[str, int]:
        """Corrupt files skipped this epoch (by this process)."""
        return {"corrupt_skipped": self.loader.skipped - self.skipped_before}


def training_epochs(
    split: Split, augment: Augment, *, batch_size: int, device: torch.device, seed: int, num_replicas: int = 1, rank: int = 0
) -> EpochBatches:
    """This process's shard of every epoch of ``split``, in the seeded order of ``seed``, augmented."""
    options = {"batch_size": batch_size, "shuffle": True, "device": device, "seed": seed, "num_replicas": num_replicas, "rank": rank}
    if isinstance(split, FileSplit):
        assert isinstance(augment, TrainRecipe)
        return StreamedEpochs(StreamingLoader(split, recipe=augment, **options), augment)  # type: ignore[arg-type]
    assert isinstance(augment, BatchAugment)
    return InMemoryEpochs(BatchLoader(split, **options), augment, len(split), seed)  # type: ignore[arg-type]
