"""Compiled against eager engine steps, per installed method: what ``train.compile`` buys.

Both trainers are built the same way from the same config except
``train.compile``; each runs one engine step (``Trainer.train_step``: the
method's step, backward, optimizer) on the same fixed batch.  The compiled one
is warmed up first (its graphs compile on the first step, the teacher's too),
then the two are timed in alternating rounds and each keeps its best round.
A ratio below 1 means the compiled step is faster.  On a CPU the workload is
scaled down (inductor's C++ compile takes minutes per method at full size).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.bench_methods import fixed_batch, job_of, seconds_per_step
from benchmarks.common import report, scaled
from benchmarks.harness import Workload, build_trainer
from kdcli.engine import Trainer
from kdcli.registry import method_plugins

GPU_WORKLOAD = Workload()
CPU_WORKLOAD = scaled(Workload(batch_size=32, steps=6, image_size=16), Workload(batch_size=8, steps=2, image_size=8))
ROUNDS = scaled(3, 1)
STEPS_PER_ROUND = scaled(5, 1)
WARMUP_STEPS = scaled(3, 2)  # compiles the student's forward and backward, and the teacher's forward
# A smoke run compiles one method: inductor's C++ compile takes a minute a method on a small CPU.
SMOKE_METHODS = scaled(None, ("kd",))


def ready_trainer(workload: Workload, method: str, job: str, scratch: Path, *, compile: bool) -> Trainer:
    config = workload.config(method, job)
    config = config.model_copy(update={"train": config.train.model_copy(update={"compile": compile})})
    trainer = build_trainer(config, workload, scratch / f"{method}-{'compiled' if compile else 'eager'}")
    trainer.task.train()
    trainer.method.on_epoch_start(1)
    return trainer


def compare(name: str, workload: Workload, scratch: Path) -> None:
    job = job_of(next(plugin.loaded for plugin in method_plugins() if plugin.name == name))
    eager = ready_trainer(workload, name, job, scratch, compile=False)
    compiled = ready_trainer(workload, name, job, scratch, compile=True)
    batch = fixed_batch(eager)
    seconds_per_step(eager, batch, WARMUP_STEPS)
    seconds_per_step(compiled, batch, WARMUP_STEPS)
    eager_times, compiled_times = [], []
    for _ in range(ROUNDS):
        eager_times.append(seconds_per_step(eager, batch, STEPS_PER_ROUND))
        compiled_times.append(seconds_per_step(compiled, batch, STEPS_PER_ROUND))
    models = f"{workload.teacher}->{workload.student}" if job == "distill" else workload.teacher
    report(
        f"compiled step {name} ({job}, {models}, batch {workload.batch_size}, {workload.image_size}px, best of {ROUNDS})",
        "eager", min(eager_times), "compiled", min(compiled_times),
    )


def main() -> None:
    workload = GPU_WORKLOAD if torch.cuda.is_available() else CPU_WORKLOAD
    with tempfile.TemporaryDirectory() as scratch:
        for plugin in method_plugins():
            if SMOKE_METHODS is not None and plugin.name not in SMOKE_METHODS:
                continue
            if plugin.error is not None:
                print(f"compiled step {plugin.name}: skipped (does not load: {plugin.error})", flush=True)
                continue
            try:
                compare(plugin.name, workload, Path(scratch))
            except Exception as exc:  # one line per method that cannot run with its defaults
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"compiled step {plugin.name}: skipped ({type(exc).__name__}: {reason})", flush=True)
            torch._dynamo.reset()  # each method's graphs on their own: no recompile limit shared between them


if __name__ == "__main__":
    main()
