"""Step cost of every installed method against its baseline, on the same models and the same batch.

A distill method is compared with ``kd``, a teach method with ``standard``: one
engine step (the method's ``training_step``, backward, optimizer and schedule
step, as ``Trainer.train_step`` runs it) on one fixed augmented batch. Methods
come from the ``kdcli.methods`` entry points, so new ones are picked up without
changes here; one that cannot be built or stepped with its default
hyperparameters prints a one-line reason instead. Baseline and candidate are
timed in alternating rounds and each keeps its best round, so drifting machine
load hits both alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import report
from benchmarks.harness import Workload, build_trainer
from kdcli.engine import Trainer
from kdcli.method import Batch, Method
from kdcli.registry import method_plugins

WORKLOAD = Workload()
ROUNDS = 3
STEPS_PER_ROUND = 5
BASELINES = {"distill": "kd", "teach": "standard"}


def job_of(method: type[Method]) -> str:
    """Distill when the method can use a teacher and distills; otherwise teach."""
    if "distill" in method.roles and (method.teacher_use != "none" or "teach" not in method.roles):
        return "distill"
    return "teach"


def fixed_batch(trainer: Trainer) -> Batch:
    """The first batch of epoch 1, augmented as the engine augments it."""
    inputs, targets, index = next(trainer.train_loader.batches(1, 0))
    return Batch(inputs, targets, index, 1)


def ready_trainer(method: str, job: str, scratch: Path) -> Trainer:
    trainer = build_trainer(WORKLOAD.config(method, job), WORKLOAD, scratch / f"{job}-{method}")
    trainer.task.train()  # the student and the method's trainable modules
    trainer.method.on_epoch_start(1)
    return trainer


def seconds_per_step(trainer: Trainer, batch: Batch, steps: int) -> float:
    synchronize = torch.cuda.synchronize if trainer.runtime.device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    synchronize()
    return (time.perf_counter() - started) / steps


def compare(name: str, job: str, candidate: Trainer, baseline: Trainer, batch: Batch) -> None:
    for trainer in (baseline, candidate):
        seconds_per_step(trainer, batch, 2)  # warm-up: allocator, kernels, lazy state
    candidate_times, baseline_times = [], []
    for _ in range(ROUNDS):
        baseline_times.append(seconds_per_step(baseline, batch, STEPS_PER_ROUND))
        candidate_times.append(seconds_per_step(candidate, batch, STEPS_PER_ROUND))
    models = f"{WORKLOAD.teacher}->{WORKLOAD.student}" if job == "distill" else WORKLOAD.teacher
    itself = " (itself: the timing noise)" if candidate is baseline else ""
    report(
        f"step cost {name} vs {BASELINES[job]}{itself} ({job}, {models}, batch {WORKLOAD.batch_size}, best of {ROUNDS})",
        BASELINES[job], min(baseline_times), name, min(candidate_times),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        baselines = {job: ready_trainer(method, job, Path(scratch)) for job, method in BASELINES.items()}
        batches = {job: fixed_batch(trainer) for job, trainer in baselines.items()}
        for plugin in method_plugins():
            if plugin.error is not None:
                print(f"step cost {plugin.name}: skipped (does not load: {plugin.error})", flush=True)
                continue
            job = job_of(plugin.loaded)
            if plugin.name == BASELINES[job]:
                compare(plugin.name, job, baselines[job], baselines[job], batches[job])
                continue
            try:
                candidate = ready_trainer(plugin.name, job, Path(scratch))
                seconds_per_step(candidate, batches[job], 1)  # fails here if the defaults cannot train
            except Exception as exc:  # one line per method that cannot run with its defaults
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"step cost {plugin.name}: skipped ({type(exc).__name__}: {reason})", flush=True)
                continue
            compare(plugin.name, job, candidate, baselines[job], batches[job])
            del candidate


if __name__ == "__main__":
    main()
