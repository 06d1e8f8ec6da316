"""Teacher-output caching: distill epochs with ``--cache-teacher`` against the same epochs without it.

Each side is a real engine ``Trainer`` (kd, the harness's models and CIFAR-shaped
synthetic data) with the same teacher checkpoint; the sides train their epochs
in alternation, so drifting machine load hits all alike, and each reports its
best training samples/s over epochs 2 and later (epoch 1 warms up).

* no random augmentation: epoch 1 fills the run's table, later epochs read it;
* crop + flip: a first cached run fills one table per epoch (its epochs cost
  what uncached ones do, plus the bookkeeping) and a second run with the same
  teacher, data and seed reads them, as ``sweep-checkpoints`` students do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import report, scaled
from benchmarks.harness import Workload, build_trainer, untrained_teacher
from kdcli.config import RunConfig
from kdcli.engine import Trainer
from kdcli.jobs.common import load_data
from kdcli.registry import load_model_plugins

WORKLOAD = scaled(Workload(), Workload(batch_size=8, steps=2))
EPOCHS = scaled(4, 2)


def write_teacher(path: Path) -> None:
    """An untrained teacher checkpoint: its cost, not its accuracy, is what is measured."""
    config = WORKLOAD.config("kd", "distill")
    load_model_plugins()
    torch.manual_seed(0)
    untrained_teacher(WORKLOAD.teacher, load_data(config.data), path, data=config.data.model_dump(mode="json"))


def distill_config(*, cache: bool, augment: bool) -> RunConfig:
    tree = WORKLOAD.config("kd", "distill").model_dump(mode="json")
    tree["train"].update(epochs=EPOCHS, cache_teacher=cache)
    tree["data"].update(crop_padding=4 if augment else 0, hflip=augment)
    return RunConfig.model_validate(tree)


def best_speeds(trainers: list[Trainer]) -> list[float]:
    """Epoch by epoch, each trainer in turn; the best samples/s of each over epochs 2 and later."""
    speeds: list[list[float]] = [[] for _ in trainers]
    for epoch in range(1, EPOCHS + 1):
        for trainer, side in zip(trainers, speeds):
            record = trainer.train_epoch(epoch)
            if epoch > 1:
                side.append(record["samples_per_s"])
    return [max(side) for side in speeds]


def main() -> None:
    models = f"{WORKLOAD.teacher}->{WORKLOAD.student} kd, batch {WORKLOAD.batch_size}, 32x32, best of epochs 2-{EPOCHS}"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        teacher = root / "teacher" / "last.safetensors"
        write_teacher(teacher)

        def trainer(name: str, *, cache: bool, augment: bool) -> Trainer:
            return build_trainer(distill_config(cache=cache, augment=augment), WORKLOAD, root / name, teacher_path=teacher)

        plain, cached = best_speeds([trainer("plain", cache=False, augment=False), trainer("cached", cache=True, augment=False)])
        report(f"teacher cache, no augmentation ({models})", "uncached", plain, "--cache-teacher", cached, unit="samples/s")
        # The second cached trainer's epoch e runs right after the first has written table e.
        sides = [trainer("augmented", cache=False, augment=True), trainer("fill", cache=True, augment=True), trainer("replay", cache=True, augment=True)]
        uncached, filling, replay = best_speeds(sides)
        report(f"teacher cache, crop+flip, first run fills per-epoch tables ({models})", "uncached", uncached, "--cache-teacher", filling, unit="samples/s")
        report(f"teacher cache, crop+flip, later run reads them ({models})", "uncached", uncached, "--cache-teacher", replay, unit="samples/s")


if __name__ == "__main__":
    main()
