"""The parts of a training run, each built once: method spec, context, teacher source, method, trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdcli.checkpoint import CheckpointInfo, checkpoint_digest, read_checkpoint_info
from kdcli.config import RunConfig, format_validation_error
from kdcli.data.augment import EpochAugmentation, normalize
from kdcli.data.bundle import DataBundle
from kdcli.data.loader import BatchLoader
from kdcli.engine import EpochObserver, Trainer, TrainingData, training_loader
from kdcli.errors import UsageError
from kdcli.jobs.common import new_model, training_data
from kdcli.method import Method, MethodContext, MethodParams
from kdcli.registry import check_logger_names, get_method
from kdcli.rundir import RunDir
from kdcli.runtime import Runtime
from kdcli.step import Batch
from kdcli.teacher import FrozenTeacher
from kdcli.teacher_cache import CachedTeacher, cache_key

DEFAULT_MODELS = {"teach": "cifar_resnet20", "distill": "cifar_resnet8"}


@dataclass(frozen=True)
class RunSpec:
    """A config resolved once: the job's defaults filled in, the method found and its ``Params`` validated."""

    config: RunConfig
    method: type[Method]
    params: MethodParams

    @property
    def model_name(self) -> str:
        assert self.config.model.name is not None  # resolve_run fills the default
        return self.config.model.name

    def with_teacher(self, teacher: Path | None) -> RunSpec:
        return RunSpec(self.config.model_copy(update={"teacher": teacher}), self.method, self.params)


def resolve_run(config: RunConfig) -> RunSpec:
    """Fill job defaults and check that method, role and teacher fit together."""
    name = config.method.name
    assert name is not None  # RunConfig fills the job's default method
    method_cls = get_method(name)
    if config.job not in method_cls.roles:
        other = "distill" if config.job == "teach" else "teach"
        raise UsageError(f"method {name!r} is not a {config.job} method; use kdcli {other} --method {name}")
    note = f" ({method_cls.teacher_note})" if method_cls.teacher_note else ""
    if method_cls.teacher_use == "required" and config.teacher is None:
        raise UsageError(f"method {name!r} needs a teacher{note}: pass --teacher CKPT.safetensors")
    if method_cls.teacher_use == "none" and config.teacher is not None:
        raise UsageError(f"method {name!r} uses no teacher network{note}; drop --teacher")
    if config.train.cache_teacher and config.teacher is None:
        raise UsageError("train.cache_teacher (--cache-teacher) caches a teacher's outputs; pass --teacher CKPT.safetensors")
    check_logger_names(config.log.to)
    try:
        params = method_cls.Params.model_validate(config.method.params)
    except ValidationError as exc:
        raise UsageError(f"invalid method hyperparameters: {format_validation_error(exc, prefix='method')}") from None
    model_name = config.model.name or _default_model(config, method_cls)
    resolved = config.model_copy(
        update={
            "model": config.model.model_copy(update={"name": model_name}),
            "method": config.method.model_validate({"name": name, **params.model_dump(mode="json")}),
        }
    )
    return RunSpec(resolved, method_cls, params)


def _default_model(config: RunConfig, method_cls: type[Method]) -> str:
    """The student when none is named: the method's choice, else the job's default."""
    teacher_arch = read_checkpoint_info(config.teacher).arch if config.teacher is not None else None
    return method_cls.default_model(teacher_arch=teacher_arch) or DEFAULT_MODELS[config.job]


def method_context(config: RunConfig, data: TrainingData, runtime: Runtime, num_classes: int) -> MethodContext:
    train = config.train
    splits = {"train": data.train, "val": data.val}

    def batches(split: str, *, shuffle: bool = False, augment: bool = False, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        samples = splits[split]
        if samples is None:
            raise UsageError("this method needs a validation split: set data.val_split above 0")
        loader = BatchLoader(samples, batch_size=batch_size or train.batch_size, shuffle=shuffle, device=runtime.device, seed=seed)
        augmentation = EpochAugmentation(data.augment, len(samples), seed, runtime.device) if augment else None
        for images, targets, index in loader:
            inputs = normalize(images, data.mean, data.std) if augmentation is None else augmentation(images, index)
            yield Batch(inputs, targets, index)

    return MethodContext(
        num_classes=num_classes,
        num_train=len(data.train),
        epochs=train.epochs,
        steps_per_epoch=len(training_loader(data.train, train, runtime)),
        device=runtime.device,
        mean=data.mean,
        std=data.std,
        world_size=runtime.world_size,
        all_gather=runtime.all_gather,
        batches=batches,
        has_val=data.val is not None,
        input_size=tuple(data.train.images.shape[1:]),
    )


def teacher_source(network: nn.Module, config: RunConfig, data: TrainingData, runtime: Runtime) -> FrozenTeacher:
    """The frozen teacher on the training device; behind a table of its logits with ``train.cache_teacher``."""
    network = runtime.place(network, config.train)
    if not config.train.cache_teacher:
        return FrozenTeacher(network)
    assert config.teacher is not None  # RunConfig refuses a cache without a teacher
    key = cache_key(config.teacher, data.train, data.augment, seed=config.train.seed, precision=str(runtime.autocast_dtype))
    return CachedTeacher(
        network,
        teacher_path=config.teacher,
        key=key,
        num_samples=len(data.train),
        per_epoch=data.augment.is_random,
        all_reduce_sum=runtime.all_reduce_sum,
        writes=runtime.is_main,
    )


def teacher_lineage(path: Path) -> dict[str, Any]:
    """What a student records about its teacher: the file's digest, architecture, accuracy, and its own lineage."""
    info = read_checkpoint_info(path)
    teacher = {
        "file": str(path), "sha256": checkpoint_digest(path), "arch": info.arch, "method": info.method,
        "epoch": info.epoch, "val_top1": info.metrics.get("val_top1"),
    }
    return {"teacher": teacher | ({"lineage": info.lineage} if info.lineage else {})}


def checkpoint_template(spec: RunSpec, bundle: DataBundle) -> CheckpointInfo:
    config = spec.config
    return CheckpointInfo(
        arch=spec.model_name,
        num_classes=bundle.num_classes,
        input_size=bundle.input_size,
        mean=bundle.mean,
        std=bundle.std,
        method=str(config.method.name),
        epoch=0,
        data=config.data.model_dump(mode="json"),
        config=config.model_dump(mode="json"),
        lineage={} if config.teacher is None else teacher_lineage(config.teacher),
    )


@dataclass
class TrainingParts:
    """What a training run is made of, built in the order that fixes its random initialization."""

    data: TrainingData
    teacher: FrozenTeacher | None
    method: Method
    trainer: Trainer


def build_training(
    spec: RunSpec,
    bundle: DataBundle,
    teacher: nn.Module | None,
    runtime: Runtime,
    run_dir: RunDir,
    *,
    show_progress: bool,
    record_hooks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> TrainingParts:
    """Student, teacher source, method and trainer; the student draws its initialization from the run's seed."""
    config = spec.config
    torch.manual_seed(config.train.seed)
    student = runtime.place(new_model(spec.model_name, num_classes=bundle.num_classes, input_size=bundle.input_size), config.train)
    data = training_data(bundle, config.data)
    source = None if teacher is None else teacher_source(teacher, config, data, runtime)
    method = spec.method(spec.params, student=student, teacher=source, context=method_context(config, data, runtime, bundle.num_classes))
    observers: dict[str, EpochObserver] = {"teacher_cache": source} if isinstance(source, CachedTeacher) else {}
    trainer = Trainer(
        method, data, config, runtime, run_dir, checkpoint_template(spec, bundle), show_progress=show_progress, observers=observers,
        record_hooks=record_hooks,
    )
    return TrainingParts(data, source, method, trainer)
