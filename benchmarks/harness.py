"""Build a real kdcli ``Trainer`` outside the CLI, so benchmarks time exactly the engine's step."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcli.checkpoint import CheckpointInfo
from kdcli.config import RunConfig
from kdcli.engine import Trainer, method_context, prepare_student, prepare_teacher, setup_runtime
from kdcli.jobs.common import load_data, model_from_checkpoint, training_data
from kdcli.jobs.train import cached_teacher, resolve_config
from kdcli.models import create_model
from kdcli.registry import get_method, load_model_plugins
from kdcli.rundir import RunDir


@dataclass
class Workload:
    """One benchmark setting: models, CIFAR-shaped synthetic data, batch, steps."""

    teacher: str = "cifar_resnet20"
    student: str = "cifar_resnet8"
    batch_size: int = 64
    steps: int = 30
    image_size: int = 32

    def config(self, method: str, job: str, extra: dict[str, Any] | None = None) -> RunConfig:
        tree: dict[str, Any] = {
            "job": job,
            "method": {"name": method, **(extra or {})},
            "model": {"name": self.student if job == "distill" else self.teacher},
            "data": {
                "val_split": 0.1,
                "crop_padding": 4,
                "hflip": True,
                "synthetic": {"image_size": self.image_size, "num_train": int(self.batch_size * self.steps / 0.9) + 2, "num_test": 64},
            },
            "train": {"batch_size": self.batch_size, "epochs": 1},
        }
        if job == "distill" and get_method(method).teacher_use != "none":
            # build_trainer makes an untrained teacher itself; the path only satisfies resolve_config.
            tree["teacher"] = "untrained-teacher.safetensors"
        return RunConfig.model_validate(tree)


def build_trainer(config: RunConfig, workload: Workload, run_dir: Path, teacher_path: Path | None = None) -> Trainer:
    """Exactly what ``run_training`` assembles, minus the run directory's files.

    The teacher is untrained unless ``teacher_path`` names a checkpoint, which
    ``train.cache_teacher`` also needs (its tables live beside it).
    """
    config, method_cls, params = resolve_config(config)
    load_model_plugins()
    bundle = load_data(config.data)
    torch.manual_seed(0)
    runtime = setup_runtime(config.train)
    data = training_data(bundle, config.data)
    teacher = teacher_cache = None
    if method_cls.teacher_use != "none":
        if teacher_path is None:
            teacher = create_model(workload.teacher, num_classes=bundle.num_classes, input_size=bundle.input_size)
        else:
            teacher, _ = model_from_checkpoint(teacher_path)
        teacher = prepare_teacher(teacher, runtime, config.train)
        if config.train.cache_teacher and teacher_path is not None:
            teacher_cache = cached_teacher(teacher, teacher_path, data, config.train.seed, runtime)
    student = create_model(config.model.name, num_classes=bundle.num_classes, input_size=bundle.input_size)
    method = method_cls(
        params,
        student=prepare_student(student, runtime, config.train),
        teacher=teacher if teacher_cache is None else teacher_cache,
        context=method_context(config, data, runtime, bundle.num_classes),
    )
    template = CheckpointInfo(arch=config.model.name, num_classes=bundle.num_classes, input_size=bundle.input_size, mean=bundle.mean, std=bundle.std, method=config.method.name, epoch=0)
    return Trainer(method, data, config, runtime, RunDir(run_dir), template, show_progress=False, teacher_cache=teacher_cache)


def trainer_throughput(config: RunConfig, workload: Workload) -> float:
    """Training samples per second of one engine epoch (after a warm-up epoch)."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(config, workload, Path(scratch))
        trainer.train_epoch(1)  # warm-up: allocator, kernels, lazy init
        record = trainer.train_epoch(2)
    return record["samples_per_s"]
