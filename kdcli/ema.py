"""An exponential moving average of the student's weights (``--ema DECAY``), on timm's ``ModelEmaV3``.

It is updated after every optimizer step, evaluated beside the raw student
each epoch, saved as the run directory's ``ema.safetensors`` (an ordinary
kdcli checkpoint: ``eval``, ``export`` and ``predict`` take it) and kept in the
resume state, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

EMA_PREFIX = "ema_"  # the EMA's validation numbers in an epoch record: ema_val_top1 beside val_top1


class StudentEma:
    """A copy of ``student`` (in eval mode) whose floating weights and buffers follow it with ``decay``."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        # A fixed decay and the student's own dtype (fp32 under autocast): no step count and no
        # stochastic rounding, so the state is just the averaged weights.
        self.average = ModelEmaV3(student, decay=decay)
        self.module: nn.Module = self.average.module

    def update(self, student: nn.Module) -> None:
        self.average.update(student)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


def ema_scores(scores: dict[str, float]) -> dict[str, float]:
    """The EMA's validation numbers as an epoch record names them."""
    return {f"{EMA_PREFIX}{name}": value for name, value in scores.items()}


def ema_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What ``ema.safetensors`` records as its metrics: the EMA's own numbers under the usual names (val_top1)."""
    return {name.removeprefix(EMA_PREFIX): value for name, value in record.items() if name.startswith(EMA_PREFIX) and isinstance(value, float)}
