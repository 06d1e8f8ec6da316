"""EMA overhead: the engine's training throughput with ``--ema`` against the same trainer without it.

One real ``Trainer`` (KD, CIFAR-shaped synthetic data) built with an EMA runs
epochs alternately with and without its update, so both sides share the
process, the data and the warm caches, and drifting machine load affects both
alike.  Target: ≤ 5 % (a throughput ratio ≥ 0.95x).
``python -m benchmarks --smoke ema`` runs a few small steps, to check the benchmark itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import report, scaled, seconds_per_call
from benchmarks.harness import Workload, build_trainer

WORKLOAD = scaled(Workload(), Workload(batch_size=8, steps=2, image_size=16))
REPEATS = scaled(4, 1)
DECAY = 0.999


def main(workload: Workload = WORKLOAD) -> None:
    base = workload.config("kd", "distill")
    config = base.model_copy(update={"train": base.train.model_copy(update={"ema_decay": DECAY, "epochs": 1 + 2 * REPEATS})})
    plain, averaged = [], []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(config, workload, Path(scratch))
        ema = trainer.update.ema
        trainer.train_epoch(1)  # warm-up: allocator, kernels, lazy init
        epoch = 1
        for repeat in range(REPEATS):
            for side in (ema, None) if repeat % 2 else (None, ema):  # ABBA: drifting load cancels
                trainer.update.ema = side
                epoch += 1
                (plain if side is None else averaged).append(trainer.train_epoch(epoch)["samples_per_s"])
        update_s = seconds_per_call(lambda: ema.update(trainer.student))
    report(
        f"EMA overhead ({workload.student} KD, batch {workload.batch_size}, {workload.steps} steps, best of {REPEATS})",
        "no EMA", max(plain), f"--ema {DECAY}", max(averaged), unit="samples/s", target=">= 0.95x",
    )
    # The update alone against a whole step: the same ratio, free of the epochs' noise on a loaded machine.
    step_s = workload.batch_size / max(plain)
    report("EMA update per optimizer step", "step", step_s, "EMA update", update_s, unit="s", target="<= 0.05x")


if __name__ == "__main__":
    main()
