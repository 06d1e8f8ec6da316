"""The optimizer (with its parameter groups) and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from kdcli.config import OptimConfig, ScheduleConfig
from kdcli.errors import UsageError

ParamGroup = dict[str, Any]


def parameter_groups(trainable: nn.Module, student: nn.Module, optim: OptimConfig) -> list[ParamGroup]:
    """The trainable parameters as optimizer groups, each with its own ``lr`` and ``weight_decay``.

    ``optim.no_decay_norm_bias``: norm weights, biases and other 1-d parameters get no weight decay
    (timm's rule); off, every parameter sits in one group, as kdcli 0.2 built it.  ``optim.layer_decay``:
    the student's layers (timm's grouping) get lr × layer_decay^(depth from the head); the method's
    own trainable modules (connectors) keep the full lr.
    """
    if optim.layer_decay is None and not optim.no_decay_norm_bias:
        return [{"params": [parameter for parameter in trainable.parameters() if parameter.requires_grad], "lr": optim.lr}]
    groups = param_groups_weight_decay(trainable, optim.weight_decay)
    if optim.layer_decay is not None:
        groups = _student_layer_groups(student, optim) + _without(groups, set(map(id, student.parameters())))
    if not optim.no_decay_norm_bias:  # layer groups only: every parameter decays
        groups = [{**group, "weight_decay": optim.weight_decay} for group in groups]
    return [{**group, "lr": optim.lr * group.pop("lr_scale", 1.0)} for group in groups]


def _student_layer_groups(student: nn.Module, optim: OptimConfig) -> list[ParamGroup]:
    groups = param_groups_layer_decay(student, optim.weight_decay, layer_decay=optim.layer_decay)
    if len({group["lr_scale"] for group in groups}) < 2:
        name = getattr(student, "pretrained_cfg", {}).get("architecture", type(student).__name__)
        raise UsageError(f"optim.layer_decay: timm cannot group the layers of {name} (it has no group_matcher); drop optim.layer_decay")
    return groups


def _without(groups: list[ParamGroup], excluded: set[int]) -> list[ParamGroup]:
    """``groups`` less the parameters in ``excluded`` (by id); groups left empty are dropped."""
    kept = [{**group, "params": [p for p in group["params"] if id(p) not in excluded]} for group in groups]
    return [group for group in kept if group["params"]]


def build_optimizer(groups: list[ParamGroup], optim: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """``fused`` (for CUDA parameters): one kernel per step, and the fp16 gradient scaler
    hands its inf check to the kernel instead of reading it on the host every step."""
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused or None)
    return torch.optim.SGD(
        groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay,
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
    """Stepped once per optimizer step (skipped steps too, so later epochs keep their rates); ``steps_per_epoch``
    counts optimizer steps, not micro-batches.  One factor scales every group's own peak lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule=schedule, epochs=epochs, steps_per_epoch=steps_per_epoch)
    )
