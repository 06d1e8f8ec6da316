"""The one training loop: every teach and distill run goes through ``Trainer.fit``.

The engine owns devices, precision, distributed training, the optimizer and
schedule, progress, validation, checkpoints and resume.  It calls a method's
hooks and sums the loss terms its ``training_step`` returns; it never names a
method.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.utils import unwrap_model
from torch import Tensor, nn

from kdcli.checkpoint import (
    CheckpointInfo,
    WriteFailed,
    flatten_state,
    load_state,
    read_state_label,
    save_checkpoint,
    save_state,
    structure_mismatch,
    tensors_mismatch,
)
from kdcli.config import OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from kdcli.data.augment import BatchAugment, EpochAugmentation, normalize
from kdcli.data.bundle import ImageSplit
from kdcli.data.loader import BatchLoader
from kdcli.errors import KdcliError, first_line
from kdcli.method import Batch, Method, MethodContext, StepOutput
from kdcli.rundir import RunDir
from kdcli.teacher_cache import CachedTeacher

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

    def per_rank_batch_size(self, global_batch_size: int) -> int:
        """``--batch-size`` is global: each of the world's processes takes an equal share."""
        if global_batch_size % self.world_size:
            raise KdcliError(
                f"--batch-size {global_batch_size} is the global batch and must divide evenly over {self.world_size} processes"
            )
        return global_batch_size // self.world_size

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process; every process must ask at the same point."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor(float(flag), device=self.device)).item())

    def shutdown(self) -> None:
        """Leave the process group (torchrun warns about processes that do not)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

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


AUGMENTATION_STREAM = 2**40  # keeps augmentation seeds apart from every rank's epoch_seed


def augmentation_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's augmentation draws: the same on every rank, so DDP sees the 1-process views.

    Changing this changes what cached teacher tables mean: bump ``kdcli.teacher_cache.CACHE_FORMAT``.
    """
    return epoch_seed(seed, epoch, AUGMENTATION_STREAM)


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


def training_loader(split: ImageSplit, train: TrainConfig, runtime: Runtime) -> BatchLoader:
    """This process's shard of every epoch, in the seeded order of ``train.seed``."""
    return BatchLoader(
        split, batch_size=runtime.per_rank_batch_size(train.batch_size), shuffle=True, device=runtime.device,
        seed=train.seed, num_replicas=runtime.world_size, rank=runtime.rank,
    )


def method_context(config: RunConfig, data: TrainingData, runtime: Runtime, num_classes: int) -> MethodContext:
    train = config.train
    steps = len(training_loader(data.train, train, runtime))
    splits = {"train": data.train, "val": data.val}

    def batches(split: str, *, shuffle: bool = False, augment: bool = False, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        samples = splits[split]
        if samples is None:
            raise KdcliError("this method needs a validation split: set --val-split above 0")
        loader = BatchLoader(samples, batch_size=batch_size or train.batch_size, shuffle=shuffle, device=runtime.device, seed=seed)
        augmentation = EpochAugmentation(data.augment, len(samples), seed, runtime.device) if augment else None
        for images, targets, index in loader:
            inputs = normalize(images, data.mean, data.std) if augmentation is None else augmentation(images, index)
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
    """A loss term became NaN or infinite and ``train.nonfinite_loss`` is ``stop``."""


STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while training.

    The first one only records itself: the loop finishes the running step,
    saves an exact resume state and ends the run.  A second one raises
    ``KeyboardInterrupt`` at once; files on disk stay whole because every
    write is atomic.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @contextmanager
    def caught(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


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
        self.correct += output.logits.detach().argmax(dim=1).eq(targets).sum()
        for name, value in _step_numbers(output).items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * size

    def running(self) -> tuple[float, float]:
        """Mean total loss and accuracy so far (waits for the device)."""
        if self.seen == 0:
            return math.nan, math.nan
        return (self.sums["loss/total"] / self.seen).item(), self.correct.item() / self.seen

    def state(self) -> dict[str, Any]:
        return {
            "lr": self.lr, "correct": self.correct, "sums": dict(self.sums), "step": self.step,
            "seen": self.seen, "skipped": self.skipped, "elapsed": self.elapsed,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochTally:
        moved = {"correct": state["correct"].to(device), "sums": {name: value.to(device) for name, value in state["sums"].items()}}
        return cls(**{**state, **moved})


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
        teacher_cache: CachedTeacher | None = None,
    ) -> None:
        self.method = method
        self.teacher_cache = teacher_cache
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
        self.train_loader = training_loader(data.train, train, runtime)
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
        self.stop = StopSignals()
        # Set by a mid-epoch resume state: where in ``start_epoch`` to go on, and the method state to go on with.
        self.position: dict[str, Any] | None = None
        self.position_method_state: dict[str, Any] | None = None
        # (step, loss names, finite flags) since the last check: read on the device's schedule, not every step.
        self.pending_finite: list[tuple[int, list[str], Tensor]] = []

    # -- resume state -------------------------------------------------------------

    def state(self, epoch: int, position: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` (or, with ``position``, inside the next one)."""
        return {
            "epoch": epoch,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "history": self.history,
            "best": self.best,
            "position": position,
        }

    def resume(self) -> None:
        """Continue from the run directory's resume state; without one (stopped in epoch 1) start over."""
        path = self.run_dir.resume_path
        if not path.exists():
            self._note(f"{self.run_dir.root} has no saved training state yet: starting at epoch 1 with its saved config")
            return
        self.restore(load_state(path), path)
        if self.position is None and self.history and self.runtime.is_main:
            # A crash between writing the resume state and the files after it leaves those one epoch behind.
            epoch = self.history[-1]["epoch"]
            with self._writing():
                self._write_epoch_files(epoch, self.history[-1], improved=self.best["epoch"] == epoch)
        self._note(f"resuming {self.run_dir.root} after {read_state_label(path)}")

    def _note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def restore(self, state: Any, source: Path) -> None:
        """Load a resume state once it has the structure this run saves; another run's or a damaged one is refused."""
        problem = self._state_problem(state)
        if problem is None:
            try:
                self._apply(state)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                problem = first_line(exc)
        if problem is not None:
            raise KdcliError(f"{source} does not fit this run ({problem}): it is damaged or from another config")

    def _apply(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = state["epoch"] + 1
        self.position = state["position"]
        if self.position is not None:
            self.position_method_state = state["method"]
            rng = self.position["rng"]
            torch.Generator().set_state(rng["torch"])  # fail here, not mid-epoch, on a state torch refuses

    def _state_problem(self, state: Any) -> str | None:
        """The first way ``state`` differs from what this run would save, or None."""
        template = self.state(0)
        if not isinstance(state, dict) or state.keys() != template.keys():
            return "not the top-level keys of a resume state"
        checks = (
            lambda: structure_mismatch(state["model"], template["model"], "model"),
            lambda: self._optimizer_problem(state["optimizer"], template["optimizer"]),
            lambda: structure_mismatch(state["scheduler"], template["scheduler"], "scheduler"),
            lambda: structure_mismatch(state["scaler"], template["scaler"], "scaler"),
            lambda: _shared_tensors_mismatch(state["method"], template["method"], "method"),
            lambda: self._progress_problem(state),
        )
        return next((found for check in checks if (found := check())), None)

    def _optimizer_problem(self, loaded: Any, template: dict[str, Any]) -> str | None:
        # Per-parameter state appears lazily with the first step, so it is checked against the parameters themselves.
        if not isinstance(loaded, dict) or loaded.keys() != template.keys():
            return "optimizer should hold state and param_groups"
        if found := structure_mismatch(loaded["param_groups"], template["param_groups"], "optimizer/param_groups"):
            return found
        if [group["params"] for group in loaded["param_groups"]] != [group["params"] for group in template["param_groups"]]:
            return "optimizer/param_groups name other parameters"
        parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        if not isinstance(loaded["state"], dict):
            return "optimizer/state should be a mapping"
        for index, values in loaded["state"].items():
            if type(index) is not int or not 0 <= index < len(parameters) or not isinstance(values, dict):
                return f"optimizer/state/{index} belongs to no parameter"
            parameter = parameters[index]
            for name, value in values.items():
                # torch's SGD and AdamW keep a scalar step count and buffers shaped like the parameter.
                if name == "step":
                    fits = type(value) in (int, float) or (isinstance(value, Tensor) and value.is_floating_point() and value.numel() == 1)
                else:
                    fits = value is None or (isinstance(value, Tensor) and (value.shape, value.dtype) == (parameter.shape, parameter.dtype))
                if not fits:
                    return f"optimizer/state/{index}/{name} does not fit a {str(parameter.dtype).removeprefix('torch.')} parameter of shape {list(parameter.shape)}"
        return None

    def _progress_problem(self, state: dict[str, Any]) -> str | None:
        epoch, history, position, epochs = state["epoch"], state["history"], state["position"], self.config.train.epochs
        if type(epoch) is not int or not 0 <= epoch <= epochs:
            return f"epoch {epoch!r} is outside 0..{epochs}"
        if not isinstance(history, list) or len(history) != epoch:
            return f"history should hold one record for each of {epoch} epochs"
        for number, record in enumerate(history, start=1):
            if not isinstance(record, dict) or record.get("epoch") != number or type(record.get("skipped_steps")) is not int:
                return f"history record {number} is damaged"
        if found := structure_mismatch(state["best"], {"epoch": 0, "val_top1": 0.0}, "best"):
            return found
        return None if position is None else self._position_problem(position, epoch)

    def _position_problem(self, position: Any, epoch: int) -> str | None:
        if self.runtime.distributed:
            return "it was saved inside an epoch by a single process; resume it without torchrun"
        tally = position.get("tally") if isinstance(position, dict) else None
        sums = tally.get("sums") if isinstance(tally, dict) else None
        if not isinstance(sums, dict):
            return "position/tally/sums should be a mapping"
        zeros = EpochTally(lr=0.0, correct=torch.zeros(()), sums={name: torch.zeros(()) for name in sums})
        template = {"epoch": 0, "tally": zeros.state(), "rng": self._rng_states()}
        if found := structure_mismatch(position, template, "position"):
            return found
        if position["epoch"] != epoch + 1 or not 0 <= position["tally"]["step"] < len(self.train_loader):
            return f"position is not inside epoch {epoch + 1}"
        return None

    def _rng_states(self) -> dict[str, Tensor]:
        states = {"torch": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        return states

    def _set_rng_states(self, states: dict[str, Tensor]) -> None:
        torch.set_rng_state(states["torch"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self.runtime.device)

    # -- the loop -----------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        epochs = self.config.train.epochs
        # Under torchrun the processes would first have to agree on a step to stop at:
        # there Ctrl-C keeps the last completed epoch (KeyboardInterrupt below).
        with self.stop.caught(enabled=not self.runtime.distributed):
            try:
                for epoch in range(self.start_epoch, epochs + 1):
                    record = self.train_epoch(epoch)
                    record.update(self.validate())
                    record["method"] = {**record.get("method", {}), **self.method.on_epoch_end(epoch)}
                    improved = "val_top1" in record and record["val_top1"] > self.best["val_top1"]
                    if improved:
                        self.best = {"epoch": epoch, "val_top1": record["val_top1"]}
                    self.history.append(record)
                    self.save(epoch, record, improved=improved)
                    self.console.print(_epoch_line(record, epochs))
                    if self.stop.received is not None:
                        self._stopped(f"epoch {epoch} is complete and saved ({self.run_dir.last_path}, {self.run_dir.resume_path.name})")
                    if self._patience_exhausted(epoch):
                        self.console.print(f"early stop: no better val top-1 since epoch {self.best['epoch']}")
                        break
            except KeyboardInterrupt:
                raise KdcliError(f"interrupted, stopped at once; {self._on_disk()}; continue with: {self._resume_command()}", exit_code=130) from None
        return self.history

    def _patience_exhausted(self, epoch: int) -> bool:
        patience = self.config.train.early_stop_patience
        return patience is not None and epoch - self.best["epoch"] >= patience

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        runtime, train = self.runtime, self.config.train
        torch.manual_seed(epoch_seed(train.seed, epoch, runtime.rank))
        augmentation = EpochAugmentation(self.data.augment, len(self.data.train), augmentation_seed(train.seed, epoch), runtime.device)
        self.train_loader.set_epoch(epoch)
        self.student.train()
        self.extra_modules.train()
        self.method.on_epoch_start(epoch)
        if self.teacher_cache is not None:
            self.teacher_cache.start_epoch(epoch)
        if self.position is not None:
            tally = self._continue_inside_epoch()
        else:
            tally = EpochTally(lr=self.optimizer.param_groups[0]["lr"], correct=torch.zeros((), device=runtime.device))
        steps = len(self.train_loader)
        started = time.perf_counter()
        with self._progress(epoch, tally.step) as advance:
            for images, targets, index in itertools.islice(self.train_loader, tally.step, None):
                if self.stop.received is not None:
                    self._stop_inside_epoch(epoch, tally, started)
                inputs = augmentation(images, index)
                if train.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                batch = Batch(inputs, targets, index)
                with self._serving_teacher(batch):
                    output = self.train_step(batch)
                tally.step += 1
                if output is None:
                    tally.skipped += 1
                else:
                    tally.add(output, targets)
                    self._watch_finite(tally.step, output)
                if tally.step % PROGRESS_REFRESH_STEPS == 0 or tally.step == steps:
                    self._check_finite(epoch)
                    advance(tally.step, *tally.running())
        tally.elapsed += time.perf_counter() - started
        return self._epoch_record(epoch, tally)

    def _continue_inside_epoch(self) -> EpochTally:
        """Pick up a mid-epoch resume state after ``on_epoch_start`` has run again.

        ``on_epoch_start`` re-creates what a method derives from the epoch number;
        the saved method state then overrides whatever else it changed.
        Augmentation needs no state: it is a function of (seed, epoch, sample).
        """
        position, self.position = self.position, None
        self.method.load_state_dict(self.position_method_state)
        self._set_rng_states(position["rng"])
        return EpochTally.from_state(position["tally"], self.runtime.device)

    def _epoch_record(self, epoch: int, tally: EpochTally) -> dict[str, Any]:
        device = self.runtime.device
        totals = self.runtime.all_reduce_sum(torch.stack([tally.correct, torch.tensor(float(tally.seen), device=device)]))
        means = {name: (self.runtime.all_reduce_sum(value) / totals[1]).item() for name, value in tally.sums.items()}
        record = {
            "epoch": epoch,
            "lr": tally.lr,
            "time_s": round(tally.elapsed, 3),
            "samples_per_s": round(totals[1].item() / tally.elapsed, 1),
            "loss": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("loss/")},
            "train_top1": (totals[0] / totals[1]).item(),
            "skipped_steps": tally.skipped,
            "method": {name.split("/", 1)[1]: value for name, value in means.items() if name.startswith("log/")},
        }
        if self.teacher_cache is not None:
            record["teacher_cache"] = self.teacher_cache.finish_epoch()
        return record

    def _serving_teacher(self, batch: Batch) -> Any:
        """With --cache-teacher, the teacher answers calls on this batch's inputs from its table."""
        return nullcontext() if self.teacher_cache is None else self.teacher_cache.serving(batch)

    def train_step(self, batch: Batch) -> StepOutput | None:
        """One optimizer step; None when ``train.nonfinite_loss = skip`` dropped it for a non-finite loss."""
        with self.runtime.autocast():
            output = self.method.training_step(batch)
        loss = sum(output.losses.values())
        output.losses["total"] = loss
        if self.config.train.nonfinite_loss == "skip" and self.runtime.any_rank(not bool(_finite_flags(output).all())):
            self.scheduler.step()  # the schedule counts every step, so later epochs keep their learning rates
            return None
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

    # -- non-finite losses and stopping -----------------------------------------------

    def _watch_finite(self, step: int, output: StepOutput) -> None:
        if self.config.train.nonfinite_loss == "stop":
            self.pending_finite.append((step, list(output.losses), _finite_flags(output)))

    def _check_finite(self, epoch: int) -> None:
        """Stop at the first non-finite loss term watched since the last check (one device sync for all)."""
        if self.config.train.nonfinite_loss != "stop":
            return
        pending, self.pending_finite = self.pending_finite, []
        first_bad = None
        if pending:
            flags = iter(torch.cat([finite for _, _, finite in pending]).tolist())
            for step, names, _ in pending:
                bad = [name for name in names if not next(flags)]
                if bad:
                    first_bad = (step, bad)
                    break
        if self.runtime.any_rank(first_bad is not None):
            raise self._nonfinite_error(epoch, first_bad)

    def _nonfinite_error(self, epoch: int, first_bad: tuple[int, list[str]] | None) -> NonFiniteLoss:
        if first_bad is None:
            what = f"a loss term went non-finite in another process in epoch {epoch}"
        else:
            step, names = first_bad
            terms = [name for name in names if name != "total"] or ["total"]  # total alone: the sum overflowed
            what = f"loss {'terms' if len(terms) > 1 else 'term'} {', '.join(terms)} went non-finite (NaN or inf) in epoch {epoch} at step {step}/{len(self.train_loader)}"
        kept = f"{self.run_dir.last_path} (epoch {self.history[-1]['epoch']}) is kept as it was" if self.history else "no epoch had been saved yet"
        return NonFiniteLoss(f"{what}; training stopped and {kept}; to skip such steps instead: --set train.nonfinite_loss=skip")

    def _stop_inside_epoch(self, epoch: int, tally: EpochTally, started: float) -> NoReturn:
        """Save an exact resume state after the last finished step and end the run."""
        self._check_finite(epoch)  # never save a state a bad step has already spoiled
        tally.elapsed += time.perf_counter() - started
        label = f"step {tally.step}/{len(self.train_loader)} of epoch {epoch}"
        position = {"epoch": epoch, "tally": tally.state(), "rng": self._rng_states()}
        with self._writing():
            save_state(self.run_dir.resume_path, self.state(epoch - 1, position), label=label)
        last = f"{self.run_dir.last_path} holds epoch {epoch - 1}" if self.history else "no epoch is complete yet"
        self._stopped(f"saved the exact training state after {label} to {self.run_dir.resume_path} ({last})")

    def _stopped(self, what: str) -> NoReturn:
        signum = self.stop.received
        raise KdcliError(f"{STOP_SIGNALS[signum]} ({signal.Signals(signum).name}): {what}; continue with: {self._resume_command()}", exit_code=128 + signum)

    def _resume_command(self) -> str:
        return f"kdcli {self.config.job} --resume {shlex.quote(str(self.run_dir.root))}"

    def _on_disk(self) -> str:
        """What ``--resume`` will continue from, read back from disk: the truth after an abrupt stop."""
        try:
            return f"{self.run_dir.resume_path} holds the state after {read_state_label(self.run_dir.resume_path)}"
        except KdcliError:
            return "no training state is saved yet (--resume starts over with the saved config)"

    # -- checkpoints --------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write ends the run, saying what is on disk and how to go on once the cause is fixed."""
        try:
            yield
        except WriteFailed as exc:
            raise WriteFailed(f"{exc}; training stopped; {self._on_disk()}; once that is fixed, continue with: {self._resume_command()}") from None

    def save(self, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        """Resume state first, then the deployable files: ``resume`` completes them after a crash in between."""
        if not self.runtime.is_main:
            return
        with self._writing():
            save_state(self.run_dir.resume_path, self.state(epoch), label=f"epoch {epoch}")
            self._write_epoch_files(epoch, record, improved=improved)

    def _write_epoch_files(self, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        metrics = {key: value for key, value in record.items() if isinstance(value, float)}
        info = replace(self.checkpoint_template, epoch=epoch, metrics=metrics)
        weights = self.student.state_dict()
        save_checkpoint(self.run_dir.last_path, weights, info)
        if improved and self.config.train.keep_best:
            save_checkpoint(self.run_dir.best_path, weights, info)
        if epoch % self.config.train.save_every == 0 or epoch == self.config.train.epochs:
            save_checkpoint(self.run_dir.epoch_checkpoint(epoch), weights, info)
        self.run_dir.write_history(self.history)

    def _progress(self, epoch: int, done: int) -> Any:
        return _EpochProgress(self.console, epoch, self.config.train.epochs, len(self.train_loader), done)


def _finite_flags(output: StepOutput) -> Tensor:
    """One flag per loss term (``total`` included), still on the device."""
    return torch.stack([torch.isfinite(value.detach()).all() for value in output.losses.values()])


def _shared_tensors_mismatch(loaded: Any, template: Any, where: str) -> str | None:
    """Tensors at the same place in both trees must agree in dtype and shape (method state may grow)."""
    loaded_tensors, template_tensors = flatten_state(loaded)[0], flatten_state(template)[0]
    shared = loaded_tensors.keys() & template_tensors.keys()
    found = tensors_mismatch({key: loaded_tensors[key] for key in shared}, {key: template_tensors[key] for key in shared})
    return None if found is None else f"{where}{found}"


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

    def __init__(self, console: Console, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console.quiet or not console.is_terminal,  # no bar (nor blank lines) in logs
        )
        self.task = self.progress.add_task("train", total=steps, completed=done, status="")

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self.advance

    def __exit__(self, *exc_info: object) -> None:
        self.progress.__exit__(*exc_info)

    def advance(self, step: int, loss: float, accuracy: float) -> None:
        self.progress.update(self.task, completed=step, status=f"loss {loss:.4f} acc {accuracy:.3f}")
