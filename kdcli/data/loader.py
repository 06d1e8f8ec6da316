"""Batches of an in-memory split, gathered on the training device.

The whole split is moved to the device once; a batch is one index gather, so
there are no worker processes and no per-sample Python. Order and sharding
come from torch's DistributedSampler, so an epoch's order is a function of
(seed, epoch) alone and a run resumed at an epoch boundary sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from kdcli.data.bundle import ImageSplit
from kdcli.errors import UsageError


class BatchLoader:
    """Yields ``(images_uint8, targets, index)`` on ``device``; ``index``: int64 positions into the split.

    With ``num_replicas > 1`` each rank gets a disjoint shard of every epoch
    (DistributedSampler pads the epoch with repeats to make the shards equal).
    When shuffling, a final batch of one sample is dropped: batch norm cannot
    train on it.
    """

    def __init__(
        self,
        split: ImageSplit,
        *,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise UsageError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batch_size = batch_size
        self.device = device
        self.images = split.images.to(device)
        self.targets = split.targets.to(device)
        # DistributedSampler works without a process group when num_replicas and rank are given.
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self.drop_single = shuffle and self.sampler.num_samples % batch_size == 1

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-self.sampler.num_samples // self.batch_size) - int(self.drop_single)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device)
        for index in order.split(self.batch_size)[: len(self)]:
            yield self.images[index], self.targets[index], index
