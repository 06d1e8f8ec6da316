"""Build a real kdcli ``Trainer`` outside the CLI, so benchmarks time exactly the engine's step."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from kdcli.checkpoint import CheckpointInfo, save_checkpoint
from kdcli.config import RunConfig
from kdcli.data.bundle import DataBundle
from kdcli.engine import Trainer
from kdcli.jobs.build import build_training, resolve_run
from kdcli.jobs.common import load_data, model_from_checkpoint
from kdcli.models import create_model
from kdcli.registry import get_method, load_model_plugins
from kdcli.rundir import RunDir
from kdcli.runtime import setup_runtime


UNTRAINED_TEACHER = "untrained-teacher.safetensors"


@dataclass
class Workload:
    """One benchmark setting: models, CIFAR-shaped synthetic data, batch, steps."""

    teacher: str = "cifar_resnet20"
    student: str = "cifar_resnet8"
    batch_size: int = 64
    steps: int = 30
    image_size: int = 32
    num_classes: int | None = None  # None: the synthetic set's default

    def classes(self) -> dict[str, int]:
        """The synthetic set's class count and its vocabulary (4 latent features per class, as CIFAR-100's check uses)."""
        return {} if self.num_classes is None else {"num_classes": self.num_classes, "vocab_size": 4 * self.num_classes}

    def config(self, method: str, job: str, extra: dict[str, Any] | None = None) -> RunConfig:
        tree: dict[str, Any] = {
            "job": job,
            "method": {"name": method, **(extra or {})},
            "model": {"name": self.student if job == "distill" else self.teacher},
            "data": {
                "val_split": 0.1,
                "crop_padding": 4,
                "hflip": True,
                "synthetic": {"image_size": self.image_size, "num_train": int(self.batch_size * self.steps / 0.9) + 2, "num_test": 64, **self.classes()},
            },
            "train": {"batch_size": self.batch_size, "epochs": 1},
        }
        if job == "distill" and get_method(method).teacher_use != "none":
            # A placeholder: build_trainer writes an untrained teacher checkpoint and points the run at it.
            tree["teacher"] = UNTRAINED_TEACHER
        return RunConfig.model_validate(tree)


def build_trainer(
    config: RunConfig, workload: Workload, run_dir: Path, teacher_path: Path | None = None, *, bundle: DataBundle | None = None
) -> Trainer:
    """Exactly what a training run assembles, minus the run directory's files.

    The teacher is an untrained ``workload.teacher``, written as a real checkpoint
    inside ``run_dir`` (a run reads its teacher's file for the student's lineage),
    unless ``teacher_path`` names one, which ``train.cache_teacher`` also needs
    (its tables live beside it).  ``bundle``: the data set ``config.data`` names,
    when already loaded (large synthetic sets take seconds to generate).
    """
    spec = resolve_run(config)
    load_model_plugins()
    bundle = bundle or load_data(spec.config.data)
    runtime = setup_runtime(spec.config.train)
    teacher = None
    if spec.method.teacher_use != "none":
        teacher_path = teacher_path or untrained_teacher(workload.teacher, bundle, run_dir / UNTRAINED_TEACHER)
        teacher, _ = model_from_checkpoint(teacher_path)
        spec = spec.with_teacher(teacher_path)
    return build_training(spec, bundle, teacher, runtime, RunDir(run_dir), show_progress=False).trainer


def untrained_teacher(arch: str, bundle: DataBundle, path: Path, *, data: dict[str, Any] | None = None) -> Path:
    """A freshly initialized ``arch`` saved as a kdcli checkpoint at ``path`` (``data``: the data config it records)."""
    model = create_model(arch, num_classes=bundle.num_classes, input_size=bundle.input_size)
    info = CheckpointInfo(
        arch=arch, num_classes=bundle.num_classes, input_size=bundle.input_size, mean=bundle.mean, std=bundle.std,
        method="standard", epoch=0, data=data or {},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.state_dict(), info)
    return path


def trainer_throughput(config: RunConfig, workload: Workload) -> float:
    """Training samples per second of one engine epoch (after a warm-up epoch)."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(config, workload, Path(scratch))
        trainer.train_epoch(1)  # warm-up: allocator, kernels, lazy init
        record = trainer.train_epoch(2)
    return record["samples_per_s"]
