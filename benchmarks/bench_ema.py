"""EMA overhead: the engine's training throughput with ``--ema`` against the same run without it.

Both sides are real ``Trainer`` epochs (KD, CIFAR-shaped synthetic data),
interleaved so drifting machine load affects both alike; the EMA side also
updates timm's ``ModelEmaV3`` after every optimizer step.  Target: ≤ 5 %
(a throughput ratio ≥ 0.95x).  ``python -m benchmarks.bench_ema --tiny`` runs a
few steps of a small batch, to check the benchmark itself.
"""

from __future__ import annotations

import sys

from benchmarks.common import report
from benchmarks.harness import Workload, trainer_throughput
from kdcli.config import RunConfig

WORKLOAD = Workload()
TINY = Workload(batch_size=16, steps=6, image_size=16)
REPEATS = 3
DECAY = 0.999


def with_ema(config: RunConfig, decay: float | None) -> RunConfig:
    return config.model_copy(update={"train": config.train.model_copy(update={"ema_decay": decay})})


def main(workload: Workload = WORKLOAD) -> None:
    config = workload.config("kd", "distill")
    plain, ema = [], []
    for _ in range(REPEATS):
        plain.append(trainer_throughput(with_ema(config, None), workload))
        ema.append(trainer_throughput(with_ema(config, DECAY), workload))
    report(
        f"EMA overhead ({workload.student} KD, batch {workload.batch_size}, {workload.steps} steps, best of {REPEATS})",
        "no EMA", max(plain), f"--ema {DECAY}", max(ema), unit="samples/s", target=">= 0.95x",
    )


if __name__ == "__main__":
    main(TINY if "--tiny" in sys.argv[1:] else WORKLOAD)
