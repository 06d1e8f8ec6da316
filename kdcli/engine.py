"""The one training loop: every teach and distill run goes through ``Trainer.fit``.

The engine owns devices, precision, distributed training, the optimizer and
schedule, progress, validation, checkpoints and resume.  It calls a method's
hooks and sums the loss terms its ``training_step`` returns; it never names a
method.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.utils import unwrap_model
from torch import Tensor, nn

from kdcli.checkpoint import CheckpointInfo, save_checkpoint, save_state
from kdcli.config import OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from kdcli.data.augment import BatchAugment, normalize
from kdcli.data.bundle import ImageSplit
from kdcli.data.loader import BatchLoader
from kdcli.errors import KdcliError
from kdcli.method import Batch, Method, MethodContext
from kdcli.rundir import RunDir

PROGRESS_REFRESH_STEPS = 10


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains: device, precision, rank and world size."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate equally shaped tensors from every rank along dim 0."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)


def setup_runtime(train: TrainConfig) -> Runtime:
    """Pick the device, join the process group under torchrun, set precision and determinism."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise KdcliError("--device cuda was requested but no CUDA device is available")
    if want_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, autocast_dtype=_autocast_dtype(train.precision, device), rank=rank, world_size=world_size)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise KdcliError("--set train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16


def prepare_student(student: nn.Module, runtime: Runtime, train: TrainConfig) -> nn.Module:
    """Move to the device and wrap for DDP and ``torch.compile``; ``unwrap_model`` undoes it."""
    student = student.to(runtime.device)
    if train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    if train.compile:
        student = torch.compile(student)
    return student


def prepare_teacher(teacher: nn.Module, runtime: Runtime, train: TrainConfig) -> nn.Module:
    """Frozen: eval mode, no gradients, on the training device."""
    teacher = teacher.to(runtime.device).eval().requires_grad_(False)
    if train.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct, reproducible seed per (run seed, epoch, rank): resuming at an epoch replays it."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


def build_optimizer(parameters: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(
        parameters, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay
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


InputTransform = Callable[[Tensor, Tensor], Tensor]  # (normalized inputs, sample index) -> inputs


def predict(
    model: nn.Module,
    split: ImageSplit,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int,
    transform: InputTransform | None = None,
) -> Tensor:
    """Logits for every sample of ``split`` in order (no augmentation; ``transform``, e.g. noise, if given), on the CPU."""
    loader = BatchLoader(split, batch_size=batch_size, shuffle=False, device=device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = []
        for images, _, index in loader:
            inputs = normalize(images, mean, std)
            if transform is not None:
                inputs = transform(inputs, index)
            logits.append(model(inputs).float().cpu())
    model.train(was_training)
    return torch.cat(logits)


@dataclass
class TrainingData:
    """The splits the engine iterates and how training batches are augmented."""

    train: ImageSplit
    val: ImageSplit | None
    augment: BatchAugment
    mean: tuple[float, ...]
    std: tuple[float, ...]


def method_context(config: RunConfig, data: TrainingData, runtime: Runtime, num_classes: int) -> MethodContext:
    train = config.train
    steps = len(BatchLoader(data.train, batch_size=train.batch_size, shuffle=True, device=torch.device("cpu"), num_replicas=runtime.world_size, rank=runtime.rank))
    splits = {"train": data.train, "val": data.val}

    def batches(split: str, *, shuffle: bool = False, augment: bool = False, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        samples = splits[split]
        if samples is None:
            raise KdcliError("this method needs a validation split: set --val-split above 0")
        loader = BatchLoader(samples, batch_size=batch_size or train.batch_size, shuffle=shuffle, device=runtime.device, seed=seed)
        generator = torch.Generator(runtime.device).manual_seed(seed)
        for images, targets, index in loader:
            inputs = data.augment(images, generator) if augment else normalize(images, data.mean, data.std)
            yield Batch(inputs, targets, index)

    return MethodContext(
        num_classes=num_classes,
        num_train=len(data.train),
        epochs=train.epochs,
        steps_per_epoch=steps,
        device=runtime.device,
        mean=data.mean,
        std=data.std,
        world_size=runtime.world_size,
        all_gather=runtime.all_gather,
        batches=batches,
        has_val=data.val is not None,
        input_size=tuple(data.train.images.shape[1:]),
    )


class NonFiniteLoss(KdcliError):
    pass


class Trainer:
    """Runs epochs of ``method`` over ``data`` and keeps ``run_dir`` resumable after each."""

    def __init__(
        self,
        method: Method,
        data: TrainingData,
        config: RunConfig,
        runtime: Runtime,
        run_dir: RunDir,
        checkpoint_template: CheckpointInfo,
        *,
        show_progress: bool = True,
    ) -> None:
        self.method = method
        self.data = data
        self.config = config
        self.runtime = runtime
        self.run_dir = run_dir
        self.checkpoint_template = checkpoint_template
        self.console = Console(stderr=True, quiet=not (show_progress and runtime.is_main))
        self.student = unwrap_model(method.student)
        self.extra_modules = nn.ModuleDict(method.trainable_modules()).to(runtime.device)
        self.parameters = [*self.student.parameters(), *self.extra_modules.parameters()]
        train = config.train
        self.train_loader = BatchLoader(
            data.train, batch_size=train.batch_size, shuffle=True, device=runtime.device,
            seed=train.seed, num_replicas=runtime.world_size, rank=runtime.rank,
        )
        self.val_loader = None if data.val is None else BatchLoader(
            data.val, batch_size=train.eval_batch_size, shuffle=False, device=runtime.device,
            num_replicas=runtime.world_size, rank=runtime.rank,
        )
        self.optimizer = build_optimizer([p for p in self.parameters if p.requires_grad], config.optim)
        steps_per_epoch = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, schedule=config.schedule, epochs=train.epochs, steps_per_epoch=steps_per_epoch),
        )
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype is torch.float16)
        self.history: list[dict[str, Any]] = []
        self.best = {"epoch": 0, "val_top1": -1.0}
        self.start_epoch = 1

    # -- resume state -------------------------------------------------------------

    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "history": self.history,
            "best": self.best,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = int(state["epoch"]) + 1

    # -- the loop -----------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        epochs = self.config.train.epochs
        for epoch in range(self.start_epoch, epochs + 1):
            try:
                record = self.train_epoch(epoch)
            except KeyboardInterrupt:
                raise KdcliError(
                    f"interrupted in epoch {epoch}; epochs up to {epoch - 1} are saved in {self.run_dir.root}; "
                    f"continue with --resume {self.run_dir.root}",
                    exit_code=130,
                ) from None
            record.update(self.validate())
            record["method"] = {**record.get("method", {}), **self.method.on_epoch_end(epoch)}
            improved = "val_top1" in record and record["val_top1"] > self.best["val_top1"]
            if improved:
                self.best = {"epoch": epoch, "val_top1": record["val_top1"]}
            self.history.append(record)
            self.save(epoch, record, improved=improved)
            self.console.print(_epoch_line(record, epochs))
            if self._patience_exhausted(epoch):
                self.console.print(f"early stop: no better val top-1 since epoch {self.best['epoch']}")
                break
        return self.history

    def _patience_exhausted(self, epoch: int) -> bool:
        patience = self.config.train.early_stop_patience
        return patience is not None and epoch - self.best["epoch"] >= patience

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        runtime, train = self.runtime, self.config.train
        seed = epoch_seed(train.seed, epoch, runtime.rank)
        torch.manual_seed(seed)
        generator = torch.Generator(runtime.device).manual_seed(seed)
        self.train_loader.set_epoch(epoch)
        self.student.train()
        self.extra_modules.train()
        self.method.on_epoch_start(epoch)

        lr_at_start = self.optimizer.param_groups[0]["lr"]
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=runtime.device)
        seen = 0
        started = time.perf_counter()
        with self._progress(epoch) as advance:
            for step, (images, targets, index) in enumerate(self.train_loader, start=1):
                inputs = self.data.augment(images, generator)
                if train.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                output = self.train_step(Batch(inputs, targets, index))
                size = targets.shape[0]
                seen += size
                correct += output.logits.detach().argmax(dim=1).eq(targets).sum()
                for name, value in _step_numbers(output).items():
                    sums[name] = sums.get(name, 0) + value.detach().float() * size
                if step % PROGRESS_REFRESH_STEPS == 0 or step == len(self.train_loader):
                    running = {name: (value / seen).item() for name, value in sums.items()}
                    self._check_finite(running, epoch, step)
                    advance(step, running.get("loss/total", float("nan")), correct.item() / seen)
        elapsed = time.perf_counter() - started
        totals = self.runtime.all_reduce_sum(torch.stack([correct, torch.tensor(float(seen), device=runtime.device)]))
        means = {name: (self.runtime.all_reduce_sum(value) / totals[1]).item() for name, value in sums.items()}
        self._check_finite(means, epoch, len(self.train_loader))
        return {
            "epoch": epoch,
            "lr": lr_at_start,
            "time_s": round(elapsed, 3),
            "samples_per_s": round(totals[1].item() / elapsed, 1),
            "loss": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("loss/")},
            "train_top1": (totals[0] / totals[1]).item(),
            "method": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("log/")},
        }

    def train_step(self, batch: Batch) -> Any:
        with self.runtime.autocast():
            output = self.method.training_step(batch)
        loss = sum(output.losses.values())
        output.losses["total"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._sync_extra_gradients()
        if self.config.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return output

    def _sync_extra_gradients(self) -> None:
        # DDP averages the student's gradients; a method's extra modules are not inside DDP.
        if not self.runtime.distributed:
            return
        for parameter in self.extra_modules.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= self.runtime.world_size

    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        self.student.eval()
        totals = torch.zeros(3, device=self.runtime.device)  # correct, nll sum, count
        with torch.inference_mode(), self.runtime.autocast():
            for images, targets, _ in self.val_loader:
                inputs = self.method.eval_inputs(normalize(images, self.data.mean, self.data.std))
                logits = self.method.student(inputs).float()
                totals[0] += logits.argmax(dim=1).eq(targets).sum()
                totals[1] += nn.functional.cross_entropy(logits, targets, reduction="sum")
                totals[2] += targets.shape[0]
        self.student.train()
        correct, nll, count = self.runtime.all_reduce_sum(totals).tolist()
        return {"val_top1": correct / count, "val_nll": nll / count}

    def _check_finite(self, numbers: dict[str, float], epoch: int, step: int) -> None:
        bad = [name for name, value in numbers.items() if name.startswith("loss/") and not math.isfinite(value)]
        if bad:
            terms = ", ".join(name.split("/", 1)[1] for name in bad if name != "loss/total") or "total"
            raise NonFiniteLoss(
                f"non-finite loss ({terms}) in epoch {epoch} by step {step}; "
                f"the last good checkpoint in {self.run_dir.root} is kept"
            )

    # -- checkpoints --------------------------------------------------------------

    def save(self, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        """Resume state first, then the deployable checkpoints: a crash between them costs nothing."""
        if not self.runtime.is_main:
            return
        save_state(self.run_dir.resume_path, self.state(epoch))
        metrics = {key: value for key, value in record.items() if isinstance(value, float)}
        info = replace(self.checkpoint_template, epoch=epoch, metrics=metrics)
        weights = self.student.state_dict()
        save_checkpoint(self.run_dir.last_path, weights, info)
        if improved and self.config.train.keep_best:
            save_checkpoint(self.run_dir.best_path, weights, info)
        if epoch % self.config.train.save_every == 0 or epoch == self.config.train.epochs:
            save_checkpoint(self.run_dir.epoch_checkpoint(epoch), weights, info)
        self.run_dir.write_history(self.history)

    def _progress(self, epoch: int) -> Any:
        return _EpochProgress(self.console, epoch, self.config.train.epochs, len(self.train_loader))


def _step_numbers(output: Any) -> dict[str, Tensor]:
    numbers = {f"loss/{name}": value for name, value in output.losses.items()}
    numbers.update({f"log/{name}": torch.as_tensor(value) for name, value in output.logs.items()})
    return numbers


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']['total']:.4f}", f"train {record['train_top1']:.3f}"]
    if "val_top1" in record:
        parts.append(f"val {record['val_top1']:.3f}")
    parts += [f"lr {record['lr']:.4g}", f"{record['time_s']:.1f}s"]
    return "  ".join(parts)


class _EpochProgress:
    """A transient rich progress bar for one epoch, with running loss and accuracy."""

    def __init__(self, console: Console, epoch: int, epochs: int, steps: int) -> None:
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console.quiet,
        )
        self.task = self.progress.add_task("train", total=steps, status="")

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self.advance

    def __exit__(self, *exc_info: object) -> None:
        self.progress.__exit__(*exc_info)

    def advance(self, step: int, loss: float, accuracy: float) -> None:
        self.progress.update(self.task, completed=step, status=f"loss {loss:.4f} acc {accuracy:.3f}")
