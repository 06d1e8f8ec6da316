"""Teacher-output caching: distill epochs with ``--cache-teacher`` against the same epochs without it.

Every side is a real ``run_training`` distill run (kd, the harness's models and
CIFAR-shaped synthetic data) from the same teacher checkpoint; the speed is the
best training samples/s over epochs 2 and later (epoch 1 warms up).

* no random augmentation: epoch 1 fills the run's table, later epochs read it;
* crop + flip: the first cached run fills one table per epoch (its epochs cost
  what uncached ones do, plus the bookkeeping), a repeated run with the same
  teacher, data and seed reads them all, as ``sweep-checkpoints`` students do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import report
from benchmarks.harness import Workload
from kdcli.checkpoint import CheckpointInfo, save_checkpoint
from kdcli.config import RunConfig
from kdcli.jobs.common import load_data
from kdcli.jobs.train import run_training
from kdcli.models import create_model
from kdcli.registry import load_model_plugins

WORKLOAD = Workload()
EPOCHS = 3


def write_teacher(path: Path) -> None:
    """An untrained teacher checkpoint: its cost, not its accuracy, is what is measured."""
    config = WORKLOAD.config("kd", "distill")
    load_model_plugins()
    bundle = load_data(config.data)
    torch.manual_seed(0)
    model = create_model(WORKLOAD.teacher, num_classes=bundle.num_classes, input_size=bundle.input_size)
    info = CheckpointInfo(
        arch=WORKLOAD.teacher, num_classes=bundle.num_classes, input_size=bundle.input_size,
        mean=bundle.mean, std=bundle.std, method="standard", epoch=0, data=config.data.model_dump(mode="json"),
    )
    save_checkpoint(path, model.state_dict(), info)


def distill_config(teacher: Path, *, cache: bool, augment: bool) -> RunConfig:
    tree = WORKLOAD.config("kd", "distill").model_dump(mode="json")
    tree["teacher"] = str(teacher)
    tree["train"].update(epochs=EPOCHS, cache_teacher=cache)
    tree["data"].update(crop_padding=4 if augment else 0, hflip=augment)
    return RunConfig.model_validate(tree)


def samples_per_second(config: RunConfig, out: Path) -> float:
    history = run_training(config, out, show_progress=False).history
    return max(record["samples_per_s"] for record in history[1:])


def main() -> None:
    models = f"{WORKLOAD.teacher}->{WORKLOAD.student} kd, batch {WORKLOAD.batch_size}, 32x32"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        teacher = root / "teacher" / "last.safetensors"
        write_teacher(teacher)
        plain = samples_per_second(distill_config(teacher, cache=False, augment=False), root / "plain")
        cached = samples_per_second(distill_config(teacher, cache=True, augment=False), root / "plain-cached")
        report(f"teacher cache, no augmentation, epochs 2-{EPOCHS} ({models})", "uncached", plain, "--cache-teacher", cached, unit="samples/s")
        uncached = samples_per_second(distill_config(teacher, cache=False, augment=True), root / "augmented")
        filling = samples_per_second(distill_config(teacher, cache=True, augment=True), root / "augmented-fill")
        replay = samples_per_second(distill_config(teacher, cache=True, augment=True), root / "augmented-replay")
        report(f"teacher cache, crop+flip, first run fills per-epoch tables ({models})", "uncached", uncached, "--cache-teacher", filling, unit="samples/s")
        report(f"teacher cache, crop+flip, repeated run reads them ({models})", "uncached", uncached, "--cache-teacher", replay, unit="samples/s")


if __name__ == "__main__":
    main()
