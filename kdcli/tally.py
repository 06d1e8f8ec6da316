"""One epoch's running sums of losses, logs and accuracy, and the record they make."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdcli.runtime import Runtime
from kdcli.step import StepOutput


@dataclass
class EpochTally:
    """One epoch's running sums; a mid-epoch resume state carries it so the epoch's record comes out exact."""

    lr: float  # at the epoch's first step
    correct: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)  # loss terms and logs, weighted by batch size
    step: int = 0  # steps done
    seen: int = 0
    skipped: int = 0
    elapsed: float = 0.0

    def add(self, output: StepOutput, targets: Tensor) -> None:
        size = targets.shape[0]
        self.seen += size
        self.correct += output.logits.detach().argmax(dim=1).eq(class_indices(targets)).sum()
        for name, value in _step_numbers(output).items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * size

    def running(self) -> tuple[float, float]:
        """Mean total loss and accuracy so far (waits for the device)."""
        if self.seen == 0:
            return math.nan, math.nan
        return (self.sums["loss/total"] / self.seen).item(), self.correct.item() / self.seen

    def record(self, epoch: int, runtime: Runtime) -> dict[str, Any]:
        """The epoch's line of ``metrics.jsonl``, summed over every process."""
        device = runtime.device
        totals = runtime.all_reduce_sum(torch.stack([self.correct, torch.tensor(float(self.seen), device=device)]))
        means = {name: (runtime.all_reduce_sum(value) / totals[1]).item() for name, value in self.sums.items()}
        return {
            "epoch": epoch,
            "lr": self.lr,
            "time_s": round(self.elapsed, 3),
            "samples_per_s": round(totals[1].item() / self.elapsed, 1),
            "loss": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("loss/")},
            "train_top1": (totals[0] / totals[1]).item(),
            "skipped_steps": self.skipped,
            "method": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("log/")},
        }

    def state(self) -> dict[str, Any]:
        return {
            "lr": self.lr, "correct": self.correct, "sums": dict(self.sums), "step": self.step,
            "seen": self.seen, "skipped": self.skipped, "elapsed": self.elapsed,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochTally:
        moved = {"correct": state["correct"].to(device), "sums": {name: value.to(device) for name, value in state["sums"].items()}}
        return cls(**{**state, **moved})


def class_indices(targets: Tensor) -> Tensor:
    """Labels [B] as they are, or the most probable class of probability targets [B, C] (Mixup/CutMix)."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def _step_numbers(output: StepOutput) -> dict[str, Tensor]:
    numbers = {f"loss/{name}": value for name, value in output.losses.items()}
    numbers.update({f"log/{name}": torch.as_tensor(value) for name, value in output.logs.items()})
    return numbers
