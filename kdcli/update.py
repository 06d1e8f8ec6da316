"""From micro-step losses to optimizer steps: gradient accumulation, clipping, the fp16 scaler, the schedule, the EMA.

``train.batch_size`` is the global batch of one optimizer step whatever the
accumulation: each process takes ``batch_size / world_size`` samples per step,
in ``train.accumulate_steps`` micro-batches.  A micro-batch's mean loss is
weighted by its share of the step's samples (1/N for full micro-batches), so N
micro-batches of B/N give the update of one batch of B.  An epoch's last group
may be short (fewer micro-batches, a smaller last one): it steps with the
samples it has, weighted as one batch of them, as the epoch's smaller last
batch does without accumulation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from kdcli.config import OptimConfig, TrainConfig
from kdcli.ema import StudentEma
from kdcli.errors import UsageError
from kdcli.runtime import Runtime


def micro_batch_size(train: TrainConfig, runtime: Runtime) -> int:
    """Samples per micro-batch in this process: the global batch over processes and micro-steps."""
    per_rank = runtime.per_rank_batch_size(train.batch_size)
    steps = train.accumulate_steps
    if per_rank % steps:
        raise UsageError(
            f"train.batch_size {train.batch_size} gives each of {runtime.world_size} process(es) {per_rank} samples a step, "
            f"which do not split into {steps} equal micro-batches (train.accumulate_steps): use a multiple of {runtime.world_size * steps}"
        )
    return per_rank // steps


def optimizer_steps(micro_steps: int, train: TrainConfig) -> int:
    """Optimizer steps in an epoch of ``micro_steps`` micro-batches: what the schedule counts."""
    return -(-micro_steps // train.accumulate_steps)


class Updater:
    """Applies a group of ``every`` micro-steps as one optimizer step; counts the micro-steps of the epoch."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        optim: OptimConfig,
        *,
        every: int,
        micro_batch: int,
        micro_steps: int,
        ema: StudentEma | None = None,
        student: nn.Module | None = None,
    ) -> None:
        self.optimizer, self.scheduler, self.scaler, self.optim = optimizer, scheduler, scaler, optim
        self.every, self.micro_batch, self.micro_steps = every, micro_batch, micro_steps
        self.ema, self.student = ema, student
        self.parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        self.step = 0  # micro-steps done in this epoch
        self._samples = 0  # samples whose gradients the open group holds
        self._spoiled = False  # a micro-step of the open group had a non-finite loss

    def begin_epoch(self, step: int) -> None:
        """Start an epoch at micro-step ``step`` (a resumed one at a saved step, always a group's first)."""
        self.step, self._samples, self._spoiled = step, 0, False

    def at_group_start(self) -> bool:
        """Whether the next micro-step opens a group: the only place a run can stop and resume exactly."""
        return self.step % self.every == 0

    def syncing(self, model: nn.Module) -> AbstractContextManager[None]:
        """Under DDP every micro-step but a group's last keeps its gradients local (``no_sync``)."""
        wrapped = _ddp_inside(model)
        return nullcontext() if wrapped is None or self._ends_group() else wrapped.no_sync()

    def backward(self, loss: Tensor, samples: int) -> None:
        if self._samples == 0:  # the group's first backward: clear what anything before it left
            self.optimizer.zero_grad(set_to_none=True)
        weighted = loss if self.every == 1 else loss * (samples / (self.every * self.micro_batch))
        self.scaler.scale(weighted).backward()
        self._samples += samples

    def finish(self, *, dropped: bool) -> None:
        """End a micro-step; ``dropped`` (a non-finite loss) drops its whole group's update.  A group's end steps."""
        self._spoiled |= dropped
        ends = self._ends_group()
        self.step += 1
        if ends:
            self._close_group()

    def end_epoch(self) -> None:
        """Apply a group the epoch's batches ended inside (a streamed epoch of fewer batches than planned)."""
        if self._samples or self._spoiled:
            self._close_group()

    def _ends_group(self) -> bool:
        return (self.step + 1) % self.every == 0 or self.step + 1 >= self.micro_steps

    def _close_group(self) -> None:
        if self._spoiled:
            self.scheduler.step()  # the schedule counts every step, so later epochs keep their learning rates
        else:
            self._optimizer_step()
        self._samples, self._spoiled = 0, False

    def _optimizer_step(self) -> None:
        full = self.every * self.micro_batch
        if self.every > 1 and self._samples != full:  # a short group: weigh it as one batch of its own samples
            torch._foreach_mul_([p.grad for p in self.parameters if p.grad is not None], full / self._samples)
        if self.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None and self.student is not None:
            self.ema.update(self.student)


def _ddp_inside(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of ``model``, under ``torch.compile``'s if it has one."""
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model
