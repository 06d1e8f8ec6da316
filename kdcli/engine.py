"""The one training loop: epochs, steps, validation and checkpoint cadence.

Every teach and distill run goes through ``Trainer.fit``.  The loop sums the
loss terms a method's step returns, steps the optimizer and keeps the run
directory resumable; it never names a method or a CLI flag.  What it leans on
lives beside it: the runtime (devices, precision, collectives), the resume
state, the guards (non-finite losses, stop signals) and the console.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

import torch
from torch import nn

from kdcli.checkpoint import CheckpointInfo, WriteFailed, atomic_write_bytes, load_state, read_state_label, save_checkpoint, save_state
from kdcli.config import RunConfig, TrainConfig
from kdcli.data.augment import normalize
from kdcli.data.loading import Augment, EpochBatches, Split, split_loader, training_epochs
from kdcli.data.mixing import BatchMixing, MixedEpochs
from kdcli.ema import StudentEma, ema_metrics, ema_scores
from kdcli.errors import KdcliError, ResumeHint, first_line
from kdcli.guards import FiniteWatch, NonFiniteLoss, StopSignals, finite_flags, nonfinite_message
from kdcli.method import Method
from kdcli.optim import build_optimizer, build_scheduler, parameter_groups
from kdcli.progress import PROGRESS_REFRESH_STEPS, TrainingConsole
from kdcli.resume import NO_BEST, ResumeState
from kdcli.rundir import RunDir
from kdcli.runtime import Runtime, compile_errors, keeping_saved_tensors
from kdcli.seeds import epoch_seed
from kdcli.step import Batch, StepOutput
from kdcli.tally import EpochTally
from kdcli.task import TrainableModule
from kdcli.update import Updater, micro_batch_size, optimizer_steps


@dataclass
class TrainingData:
    """The splits the engine iterates (in memory or streamed) and how training batches are augmented."""

    train: Split
    val: Split | None
    augment: Augment
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    mixing: BatchMixing | None = None  # Mixup/CutMix of the training batches; their targets become [B, C] probabilities


class EpochObserver(Protocol):
    """Anything beside the method that follows epochs (a teacher-logit cache); its numbers go into the record."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def on_epoch_end(self, epoch: int) -> dict[str, Any]: ...


def training_loader(data: TrainingData, train: TrainConfig, runtime: Runtime) -> EpochBatches:
    """This process's shard of every epoch, in the seeded order of ``train.seed``, augmented (and mixed), in micro-batches."""
    epochs = training_epochs(
        data.train, data.augment, batch_size=micro_batch_size(train, runtime), device=runtime.device,
        seed=train.seed, num_replicas=runtime.world_size, rank=runtime.rank,
    )
    return epochs if data.mixing is None else MixedEpochs(epochs, data.mixing, seed=train.seed, rank=runtime.rank)


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
        observers: dict[str, EpochObserver] | None = None,
        record_hooks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        self.method, self.data, self.config, self.runtime = method, data, config, runtime
        self.run_dir = run_dir
        self.checkpoint_template = checkpoint_template
        self.observers = observers or {}
        self.record_hooks = tuple(record_hooks)  # called with each epoch's record once it is saved
        self.console = TrainingConsole(enabled=show_progress and runtime.is_main)
        self.task = TrainableModule(method)
        self.student = self.task.student
        self.model = runtime.wrap(self.task, config.train)  # the one wrapped module: the student's forward
        method.use_student_forward(keeping_saved_tensors(self.model) if method.backpropagates_twice else self.model)
        train = config.train
        self.train_loader = training_loader(data, train, runtime)
        self.val_loader = None if data.val is None else split_loader(
            data.val, batch_size=train.eval_batch_size, shuffle=False, device=runtime.device,
            num_replicas=runtime.world_size, rank=runtime.rank,
        )
        self.optimizer = build_optimizer(
            parameter_groups(self.task, self.student, config.optim), config.optim, fused=runtime.device.type == "cuda"
        )
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, epochs=train.epochs, steps_per_epoch=optimizer_steps(len(self.train_loader), train)
        )
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype is torch.float16)
        self.ema = None if train.ema_decay is None else StudentEma(self.student, train.ema_decay)
        self.update = Updater(
            self.optimizer, self.scheduler, self.scaler, config.optim, every=train.accumulate_steps,
            micro_batch=micro_batch_size(train, runtime), micro_steps=len(self.train_loader), ema=self.ema, student=self.student,
        )
        self.resume_state = ResumeState(
            self.student, self.optimizer, self.scheduler, self.scaler, method, runtime, train.epochs, len(self.train_loader), self.ema
        )
        self.history: list[dict[str, Any]] = []
        self.best = dict(NO_BEST)
        self.start_epoch = 1
        self.stop = StopSignals()
        self.finite = FiniteWatch()
        # Set by a mid-epoch resume state: where in ``start_epoch`` to go on, and the method state to go on with.
        self.position: dict[str, Any] | None = None
        self.position_method_state: dict[str, Any] | None = None

    # -- resuming -------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the run directory's resume state; without one (stopped in epoch 1) start over."""
        path = self.run_dir.resume_path
        if not path.exists():
            self.console.note(f"{self.run_dir.root} has no saved training state yet: starting at epoch 1 with its saved config")
            return
        state = load_state(path)
        if (saved_by := _processes_inside_epoch(state)) not in (None, self.runtime.world_size):
            path = self.run_dir.boundary_resume_path
            where = "the last epoch boundary" if path.exists() else "epoch 1"
            self.console.note(f"the state inside an epoch was saved by {saved_by} processes and this run has {self.runtime.world_size}: resuming from {where}")
            if not path.exists():
                return
            state = load_state(path)
        self.restore(state, path)
        if self.position is None and self.history and self.runtime.is_main:
            # A crash between writing the resume state and the files after it leaves those one epoch behind.
            epoch = self.history[-1]["epoch"]
            with self._writing():
                self._write_epoch_files(epoch, self.history[-1], improved=self.best["epoch"] == epoch)
        self.console.note(f"resuming {self.run_dir.root} after {read_state_label(path)}")

    def restore(self, state: Any, source: Any) -> None:
        """Load a resume state once it has the structure this run saves; another run's or a damaged one is refused."""
        restored, problem = self.resume_state.apply(state)
        if restored is None:
            raise KdcliError(f"{source} does not fit this run ({problem}): it is damaged or from another config")
        self.history, self.best, self.start_epoch = restored.history, restored.best, restored.start_epoch
        self.position = restored.position
        self.position_method_state = restored.method_state if restored.position is not None else None

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        # Under torchrun the processes agree on the step to stop at (``_stop_agreed``); a second
        # signal stops at once (KeyboardInterrupt below).
        with self.stop.caught(enabled=True):
            try:
                for epoch in range(self.start_epoch, self.config.train.epochs + 1):
                    if not self._run_epoch(epoch):
                        break
            except KeyboardInterrupt:
                raise KdcliError(f"interrupted, stopped at once; {self._on_disk()}", exit_code=130, resume=self._hint()) from None
            except compile_errors() as exc:  # evaluated only when something was raised
                raise KdcliError(f"torch.compile failed: {first_line(exc)}; {self._on_disk()}; train without it: --set train.compile=false") from None
        return self.history

    def _run_epoch(self, epoch: int) -> bool:
        """Train, validate, save and report ``epoch``; False when early stopping ends the run."""
        record = self.train_epoch(epoch)
        record.update(self.validate())
        record["method"] = {**record.get("method", {}), **self.method.on_epoch_end(epoch)}
        improved = "val_top1" in record and record["val_top1"] > self.best["val_top1"]
        if improved:
            self.best = {"epoch": epoch, "val_top1": record["val_top1"]}
        self.history.append(record)
        self.save(epoch, record, improved=improved)
        self.console.epoch_done(record, self.config.train.epochs, list(self.observers))
        for hook in self.record_hooks:
            hook(record)
        if self._agree_on_stop():
            self._stopped(f"epoch {epoch} is complete and saved ({self.run_dir.last_path}, {self.run_dir.resume_path.name})")
        patience = self.config.train.early_stop_patience
        if patience is not None and epoch - self.best["epoch"] >= patience:
            self.console.note(f"early stop: no better val top-1 since epoch {self.best['epoch']}")
            return False
        return True

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        tally = self._start_epoch(epoch)
        self.update.begin_epoch(tally.step)
        steps = len(self.train_loader)
        started = time.perf_counter()
        with self.console.epoch_bar(epoch, self.config.train.epochs, steps, tally.step) as bar:
            for inputs, targets, index in self.train_loader.batches(epoch, tally.step):
                # A run stops only between optimizer steps: accumulated gradients are not part of a resume state.
                if self.update.at_group_start() and self._stop_agreed(tally.step // self.update.every):
                    self._stop_inside_epoch(epoch, tally, started)
                if self.config.train.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                self._count(tally, self.train_step(Batch(inputs, targets, index, epoch)), targets)
                if tally.step % PROGRESS_REFRESH_STEPS == 0 or tally.step == steps:
                    self._check_finite(epoch)
                    bar.advance(tally.step, *tally.running())
        self.update.end_epoch()
        tally.elapsed += time.perf_counter() - started
        record = tally.record(epoch, self.runtime)
        if data_stats := self.train_loader.epoch_stats():
            record["data"] = data_stats
        record.update({name: observer.on_epoch_end(epoch) for name, observer in self.observers.items()})
        return record

    def _start_epoch(self, epoch: int) -> EpochTally:
        """Seed the epoch, call the epoch-start hooks, and pick up a mid-epoch position if one is pending."""
        torch.manual_seed(epoch_seed(self.config.train.seed, epoch, self.runtime.rank))
        self.task.train()
        self.method.on_epoch_start(epoch)
        for observer in self.observers.values():
            observer.on_epoch_start(epoch)
        if self.position is None:
            return EpochTally(lr=max(group["lr"] for group in self.optimizer.param_groups), correct=torch.zeros((), device=self.runtime.device))
        # ``on_epoch_start`` re-created what a method derives from the epoch number; the saved
        # method state overrides whatever else it changed.  Augmentation is a function of
        # (seed, epoch, sample) and needs no state.
        position, self.position = self.position, None
        entry = position["ranks"][self.runtime.rank] if "ranks" in position else {**position, "method": self.position_method_state}
        self.method.load_state_dict(entry["method"])
        self.runtime.set_rng_states(entry["rng"])
        return EpochTally.from_state(entry["tally"], self.runtime.device)

    def _count(self, tally: EpochTally, output: StepOutput | None, targets: torch.Tensor) -> None:
        tally.step += 1
        if output is None:
            tally.skipped += 1
            return
        tally.add(output, targets)
        if self.config.train.nonfinite_loss == "stop":
            self.finite.watch(tally.step, output)

    def train_step(self, batch: Batch) -> StepOutput | None:
        """One micro-step (an optimizer step after each ``train.accumulate_steps``); None when
        ``train.nonfinite_loss = skip`` dropped it (and its group's update) for a non-finite loss."""
        if self.config.train.compile:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs (reduce-overhead) may reuse the last step's output memory now
        with self.update.syncing(self.model):
            with self.runtime.autocast():
                output = self.method.training_step(batch)
            loss = sum(output.losses.values())
            output.losses["total"] = loss
            dropped = self.config.train.nonfinite_loss == "skip" and self.runtime.any_rank(not bool(finite_flags(output).all()))
            if not dropped:
                self.update.backward(loss, batch.targets.shape[0])
        self.update.finish(dropped=dropped)
        if dropped:
            return None
        self.method.after_step(batch, output)
        return output

    def validate(self) -> dict[str, float]:
        """The student's validation numbers, and its EMA's (``ema_val_top1``) when there is one."""
        if self.val_loader is None:
            return {}
        scores = self._score(self.student)
        return scores if self.ema is None else {**scores, **ema_scores(self._score(self.ema.module))}

    def _score(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, device=self.runtime.device)  # correct, nll sum, count
        with torch.inference_mode(), self.runtime.autocast():
            for images, targets, _ in self.val_loader:
                inputs = self.method.eval_inputs(normalize(images, self.data.mean, self.data.std))
                logits = model(inputs).float()
                totals[0] += logits.argmax(dim=1).eq(targets).sum()
                totals[1] += nn.functional.cross_entropy(logits, targets, reduction="sum")
                totals[2] += targets.shape[0]
        model.train(was_training)
        correct, nll, count = self.runtime.all_reduce_sum(totals).tolist()
        return {"val_top1": correct / count, "val_nll": nll / count}

    # -- stopping early -------------------------------------------------------------------

    def _check_finite(self, epoch: int) -> None:
        """Stop at the first non-finite loss term watched since the last check (one device sync for all)."""
        if self.config.train.nonfinite_loss != "stop":
            return
        first_bad = self.finite.first_bad()
        if self.runtime.any_rank(first_bad is not None):
            what = nonfinite_message(epoch, len(self.train_loader), first_bad)
            kept = f"{self.run_dir.last_path} (epoch {self.history[-1]['epoch']}) is kept as it was" if self.history else "no epoch had been saved yet"
            raise NonFiniteLoss(f"{what}; training stopped and {kept}; to skip such steps instead: set train.nonfinite_loss=skip")

    def _stop_agreed(self, step: int) -> bool:
        """Whether to stop before this step: at once in one process; under torchrun at the steps where
        the processes compare notes (every ``PROGRESS_REFRESH_STEPS``), so they all stop at the same one."""
        if not self.runtime.distributed:
            return self.stop.received is not None
        return step % PROGRESS_REFRESH_STEPS == 0 and self._agree_on_stop()

    def _agree_on_stop(self) -> bool:
        """Whether any process received a stop signal (every process asks at the same point); adopts its signal."""
        agreed = self.runtime.max_over_ranks(self.stop.received or 0)
        if agreed and self.stop.received is None:
            self.stop.received = agreed
        return bool(agreed)

    def _stop_inside_epoch(self, epoch: int, tally: EpochTally, started: float) -> NoReturn:
        """Save an exact resume state after the last finished step (every process's part of it) and end the run."""
        self._check_finite(epoch)  # never save a state a bad step has already spoiled
        tally.elapsed += time.perf_counter() - started
        label = f"step {tally.step}/{len(self.train_loader)} of epoch {epoch}"
        position = self.resume_state.position(epoch, tally)
        if self.runtime.is_main:
            with self._writing():
                if self.run_dir.resume_path.exists():  # the epoch boundary, for a resume with another world size
                    atomic_write_bytes(self.run_dir.boundary_resume_path, self.run_dir.resume_path.read_bytes())
                save_state(self.run_dir.resume_path, self.resume_state.build(epoch - 1, self.history, self.best, position), label=label)
                self.run_dir.saved_state()
        self.runtime.barrier()  # no process leaves before the state is on disk
        last = f"{self.run_dir.last_path} holds epoch {epoch - 1}" if self.history else "no epoch is complete yet"
        self._stopped(f"saved the exact training state after {label} to {self.run_dir.resume_path} ({last})")

    def _stopped(self, what: str) -> NoReturn:
        assert self.stop.received is not None
        raise KdcliError(f"{self.stop.describe()}: {what}", exit_code=128 + self.stop.received, resume=self._hint())

    def _hint(self, lead: str = "continue with") -> ResumeHint:
        return ResumeHint(job=self.config.job, run_dir=self.run_dir.root, lead=lead)

    def _on_disk(self) -> str:
        """What resuming will continue from, read back from disk: the truth after an abrupt stop."""
        try:
            return f"{self.run_dir.resume_path} holds the state after {read_state_label(self.run_dir.resume_path)}"
        except KdcliError:
            return "no training state is saved yet (resuming starts over with the saved config)"

    # -- checkpoints ----------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write ends the run, saying what is on disk and how to go on once the cause is fixed."""
        try:
            yield
        except WriteFailed as exc:
            message = f"{exc}; training stopped; {self._on_disk()}"
            raise WriteFailed(message, resume=self._hint("once that is fixed, continue with")) from None

    def save(self, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        """Resume state first, then the deployable files: ``resume`` completes them after a crash in between."""
        if not self.runtime.is_main:
            return
        with self._writing():
            save_state(self.run_dir.resume_path, self.resume_state.build(epoch, self.history, self.best), label=f"epoch {epoch}")
            self.run_dir.boundary_resume_path.unlink(missing_ok=True)  # an older boundary than the state just saved
            self._write_epoch_files(epoch, record, improved=improved)
            self.run_dir.saved_state()  # a run staged to replace another takes its place now

    def _write_epoch_files(self, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        metrics = {key: value for key, value in record.items() if isinstance(value, float)}
        info = replace(self.checkpoint_template, epoch=epoch, metrics=metrics)
        weights = self.student.state_dict()
        save_checkpoint(self.run_dir.last_path, weights, info)
        if improved and self.config.train.keep_best:
            save_checkpoint(self.run_dir.best_path, weights, info)
        if epoch % self.config.train.save_every == 0 or epoch == self.config.train.epochs:
            save_checkpoint(self.run_dir.epoch_checkpoint(epoch), weights, info)
        if self.ema is not None:
            save_checkpoint(self.run_dir.ema_path, self.ema.state_dict(), replace(info, metrics=ema_metrics(record)))
        self.run_dir.write_history(self.history)


def _processes_inside_epoch(state: Any) -> int | None:
    """How many processes saved ``state`` inside an epoch (None: saved at an epoch boundary, or unreadable)."""
    position = state.get("position") if isinstance(state, dict) else None
    if not isinstance(position, dict):
        return None
    ranks = position.get("ranks")
    return len(ranks) if isinstance(ranks, list) else 1
