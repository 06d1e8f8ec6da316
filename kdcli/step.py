"""What flows through one training step: a ``Batch`` in, a ``StepOutput`` out."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """One batch, augmented and normalized on the device.

    ``epoch`` names the training epoch whose replayable augmentation produced
    ``inputs`` (sample i's view is a function of seed, epoch and i); it is
    None for every other batch, such as a method's own pass over a split.
    A teacher-logit cache answers only batches that carry an epoch.
    """

    inputs: Tensor
    targets: Tensor  # int64 labels [B]; float class probabilities [B, C] in mixed (Mixup/CutMix) training batches
    index: Tensor  # position of each sample in its split (for per-sample state)
    epoch: int | None = None


@dataclass
class StepOutput:
    """What a training step returns: logits, loss terms to sum, and numbers to log."""

    logits: Tensor
    losses: dict[str, Tensor]
    logs: dict[str, Tensor | float] = field(default_factory=dict)
