"""Mixup and CutMix of training batches (timm's ``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``).

Applied per batch to the normalized training batches of either data path,
through ``torchvision.transforms.v2``: a batch is mixed with probability
``mix_prob``, by Mixup or CutMix (chosen with equal odds when both are on);
its targets become [B, C] class probabilities, one-hot for a batch left
unmixed, so every step of a run sees targets of one kind.  Mixing is linear
in the pixels, so mixing normalized inputs equals normalizing mixed pixels.

The draws of a step are a function of (seed, epoch, rank, step) alone and use
none of the global random stream the methods draw from: a run resumed inside
an epoch mixes its remaining batches as the uninterrupted run did.  Partners
are the neighbours within the batch, so mixed views depend on the batch
composition and are not replayable per sample (``--cache-teacher`` refuses them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from kdcli.data.loading import EpochBatches
from kdcli.seeds import epoch_seed

MIXING_STREAM = 2**41  # keeps mixing seeds apart from the epoch and augmentation streams


class BatchMixing:
    """Mixup and/or CutMix with Beta parameters ``mixup_alpha``, ``cutmix_alpha`` (0 = off), each batch with chance ``mix_prob``."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, num_classes: int) -> None:
        choices = [
            mix(alpha=alpha, num_classes=num_classes)
            for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0
        ]
        if not choices:
            raise ValueError("BatchMixing needs mixup_alpha or cutmix_alpha above 0")
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.mix_prob, self.num_classes = mix_prob, num_classes

    def __call__(self, inputs: Tensor, targets: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """``inputs`` mixed and their class-probability targets [B, C] (float32), drawn from ``seed`` alone."""
        # torchvision draws from the global CPU generator: fork it so the methods' stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if torch.rand(()).item() >= self.mix_prob:
                return inputs, F.one_hot(targets, self.num_classes).float()
            return self.mix(inputs, targets)


def mixing_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The seed of one step's mixing draws; each rank mixes its own shard differently."""
    return epoch_seed(epoch_seed(seed, epoch, rank) + step, MIXING_STREAM, 0)


class MixedEpochs:
    """A training split's batches (``EpochBatches``), each mixed by ``mixing``; targets become [B, C] probabilities."""

    def __init__(self, batches: EpochBatches, mixing: BatchMixing, *, seed: int, rank: int) -> None:
        self.inner, self.mixing, self.seed, self.rank = batches, mixing, seed, rank

    def __len__(self) -> int:
        return len(self.inner)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for step, (inputs, targets, index) in enumerate(self.inner.batches(epoch, start), start):
            mixed, soft = self.mixing(inputs, targets, mixing_seed(self.seed, epoch, self.rank, step))
            yield mixed, soft, index

    def epoch_stats(self) -> dict[str, int]:
        return self.inner.epoch_stats()
