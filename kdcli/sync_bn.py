"""``--sync-bn``: batch-norm statistics over every process's batch under torchrun (torch's SyncBatchNorm)."""

from __future__ import annotations

import os

from torch import nn

from kdcli.config import TrainConfig
from kdcli.errors import UsageError
from kdcli.runtime import Runtime


def check_sync_bn(train: TrainConfig) -> None:
    """Refuse ``train.sync_bn`` outside torchrun, where there is no other process to share statistics with."""
    if train.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError(
            "--sync-bn (train.sync_bn) shares batch-norm statistics between the processes of torchrun; "
            "run under torchrun with 2 or more processes, or drop it"
        )


def with_sync_batch_norm(student: nn.Module, train: TrainConfig, runtime: Runtime) -> nn.Module:
    """``student`` with every BatchNorm turned into SyncBatchNorm when ``train.sync_bn`` (same parameters, same
    state-dict keys: checkpoints load into the plain model)."""
    if not train.sync_bn:
        return student
    if runtime.device.type != "cuda":
        # torch's SyncBatchNorm raises on CPU tensors in training: refused here, before anything is written.
        raise UsageError("--sync-bn (train.sync_bn) needs CUDA devices: torch's SyncBatchNorm does not train on the CPU; drop it")
    return nn.SyncBatchNorm.convert_sync_batchnorm(student)
