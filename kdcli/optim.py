"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcli.config import OptimConfig, ScheduleConfig


def build_optimizer(parameters: list[nn.Parameter], optim: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """``fused`` (for CUDA parameters): one kernel per step, and the fp16 gradient scaler
    hands its inf check to the kernel instead of reading it on the host every step."""
    if optim.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused or None)
    return torch.optim.SGD(
        parameters, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay,
        fused=fused or None,
    )


def lr_factor(step: int, *, schedule: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a global step: linear warm-up, then the chosen decay."""
    epoch_progress = step / steps_per_epoch
    if epoch_progress < schedule.warmup_epochs:
        return (step + 1) / (schedule.warmup_epochs * steps_per_epoch)
    if schedule.name == "multistep":
        completed_epochs = step // steps_per_epoch
        return schedule.gamma ** sum(completed_epochs >= milestone for milestone in schedule.milestones)
    if schedule.name == "cosine":
        span = max(epochs - schedule.warmup_epochs, 1e-8)
        progress = min((epoch_progress - schedule.warmup_epochs) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, *, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (skipped steps too, so later epochs keep their rates)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule=schedule, epochs=epochs, steps_per_epoch=steps_per_epoch)
    )
