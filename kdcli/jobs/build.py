"""The parts of a training run, each built once: method spec, context, teacher source, method, trainer."""

from __future__ import annotations

from functools import partial

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdcli.checkpoint import CheckpointInfo, checkpoint_digest, read_checkpoint_info
from kdcli.config import RunConfig, TrainConfig, build_config, format_validation_error
from kdcli.data.augment import BatchAugment, EpochAugmentation, normalize
from kdcli.data.bundle import DataBundle
from kdcli.data.loading import Split, split_loader
from kdcli.engine import EpochObserver, Trainer, TrainingData, training_loader
from kdcli.errors import UsageError
from kdcli.jobs.common import DATA_LOCATION_KEYS, TIMM_PREFIX, checkpoint_data_config, is_timm_teacher, new_model, training_data
from kdcli.method import Method, MethodContext, MethodError, MethodParams
from kdcli.registry import check_logger_names, get_method
from kdcli.rundir import RunDir
from kdcli.runtime import Runtime, compiled
from kdcli.step import Batch
from kdcli.sync_bn import check_sync_bn, with_sync_batch_norm
from kdcli.teacher import FrozenTeacher, Normalization, Renormalization, Resize
from kdcli.teacher_cache import CODECS, DEFAULT_CACHE_CODEC, CachedTeacher, LogitCodec, TopKLogits, cache_key
from kdcli.update import micro_batch_size

DEFAULT_MODELS = {"teach": "cifar_resnet20", "distill": "cifar_resnet8"}
MIXING_KEYS = ("mixup_alpha", "cutmix_alpha", "mix_prob")  # data keys a student does not take from its teacher
MIXING_OFF = "set data.mixup_alpha=0 and data.cutmix_alpha=0"


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
        return RunSpec(self.config.model_copy(update={"teacher": absolute_teacher(teacher)}), self.method, self.params)


def new_run_config(job: str, *, file: Path | None, flags: dict[str, Any], overrides: list[str]) -> RunConfig:
    """A new run's config: defaults < file < flags < ``--set``; with a teacher, its data set is the default data.

    The teacher's Mixup/CutMix is not passed on: mixing needs a method that takes class probabilities, so each run chooses it.
    """
    config = build_config(defaults={"job": job}, file=file, flags=flags, overrides=overrides)
    if config.job != job:  # a config file or --set may not turn one command into the other
        raise UsageError(f"kdcli {job} runs job={job}; drop job={config.job} (or run kdcli {config.job})")
    if config.teacher is None or is_timm_teacher(config.teacher):  # a timm teacher names no data set
        return config
    teacher_data = checkpoint_data_config(read_checkpoint_info(config.teacher), config.teacher, root=None, download=False)
    data = teacher_data.model_dump(mode="json", exclude={*DATA_LOCATION_KEYS, *MIXING_KEYS})
    return build_config(defaults={"job": job, "data": data}, file=file, flags=flags, overrides=overrides)


def absolute_teacher(teacher: Path | None) -> Path | None:
    """A teacher file (or a timm ``local-dir:`` folder) as an absolute path: a resumed run must find it from
    any directory; other ``timm:NAME`` references as given."""
    local = f"{TIMM_PREFIX}local-dir:"
    if teacher is None or (is_timm_teacher(teacher) and not str(teacher).startswith(local)):
        return teacher
    if is_timm_teacher(teacher):
        return Path(local + str(Path(str(teacher).removeprefix(local)).absolute()))
    return teacher.absolute()


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
    _check_cache_settings(config.train)
    if config.train.cache_teacher and config.teacher is None:
        raise UsageError("train.cache_teacher (--cache-teacher) caches a teacher's outputs; pass --teacher CKPT.safetensors")
    if config.train.cache_teacher and is_timm_teacher(config.teacher):
        raise UsageError(
            "--cache-teacher keeps its tables beside the teacher's checkpoint file, and a timm:NAME teacher has none: "
            "drop --cache-teacher"
        )
    _check_mixing(config, name, method_cls)
    check_sync_bn(config.train)
    check_logger_names(config.log.to)
    try:
        params = method_cls.Params.model_validate(config.method.params)
    except ValidationError as exc:
        raise UsageError(f"invalid method hyperparameters: {format_validation_error(exc, prefix='method')}") from None
    model_name = config.model.name or _default_model(config, method_cls)
    # Paths absolute: a run resumed from another working directory must find the same files.
    resolved = config.model_copy(
        update={
            "teacher": absolute_teacher(config.teacher),
            "data": config.data.model_copy(update={"root": config.data.root.absolute()}),
            "model": config.model.model_copy(update={"name": model_name}),
            "method": config.method.model_validate({"name": name, **params.model_dump(mode="json")}),
        }
    )
    return RunSpec(resolved, method_cls, params)


CACHE_SETTINGS = ("cache_teacher_codec", "cache_teacher_topk", "cache_teacher_temperature")


def _check_cache_settings(train: TrainConfig) -> None:
    """The cache's settings only with the cache, and one way of keeping a row: every logit by a codec, or the top k."""
    given = [name for name in CACHE_SETTINGS if getattr(train, name) is not None]
    if given and not train.cache_teacher:
        raise UsageError(f"train.{given[0]} sets what the teacher cache keeps; add --cache-teacher")
    if train.cache_teacher_topk is not None and train.cache_teacher_codec is not None:
        raise UsageError("train.cache_teacher_topk keeps the top k logits instead of every logit: drop train.cache_teacher_codec")
    if train.cache_teacher_topk is None and train.cache_teacher_temperature is not None:
        raise UsageError("train.cache_teacher_temperature is the temperature of a top-k table: add train.cache_teacher_topk=K")


def _check_mixing(config: RunConfig, name: str, method_cls: type[Method]) -> None:
    """Mixed batches carry class probabilities as targets, and their views depend on the batch: refuse what cannot take them."""
    if not config.data.mixing:
        return
    if not method_cls.accepts_soft_targets:
        raise UsageError(
            f"method {name!r} needs class labels as targets, and Mixup/CutMix make them class probabilities: {MIXING_OFF}"
        )
    if config.train.cache_teacher:
        raise UsageError(
            "--cache-teacher replays each sample's view, and a Mixup/CutMix view depends on its batch: "
            f"drop --cache-teacher or {MIXING_OFF}"
        )


def _default_model(config: RunConfig, method_cls: type[Method]) -> str:
    """The student when none is named: the method's choice, else the job's default."""
    if config.teacher is None:
        teacher_arch = None
    elif is_timm_teacher(config.teacher):
        teacher_arch = str(config.teacher).removeprefix(TIMM_PREFIX)
    else:
        teacher_arch = read_checkpoint_info(config.teacher).arch
    return method_cls.default_model(teacher_arch=teacher_arch) or DEFAULT_MODELS[config.job]


def method_context(config: RunConfig, data: TrainingData, runtime: Runtime, num_classes: int) -> MethodContext:
    train = config.train
    splits = {"train": data.train, "val": data.val}

    def batches(split: str, *, shuffle: bool = False, augment: bool = False, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        samples = splits[split]
        if samples is None:
            raise UsageError("this method needs a validation split: set data.val_split above 0")
        if augment and not isinstance(data.augment, BatchAugment):
            raise MethodError("this method asks for augmented passes over a split, which streamed data sets do not offer yet")
        loader = split_loader(samples, batch_size=batch_size or train.batch_size, shuffle=shuffle, device=runtime.device, seed=seed)
        augmentation = EpochAugmentation(data.augment, len(samples), seed, runtime.device) if augment else None
        for images, targets, index in loader:
            inputs = normalize(images, data.mean, data.std) if augmentation is None else augmentation(images, index)
            yield Batch(inputs, targets, index)

    return MethodContext(
        num_classes=num_classes,
        num_train=len(data.train),
        epochs=train.epochs,
        steps_per_epoch=len(training_loader(data, train, runtime)),
        device=runtime.device,
        mean=data.mean,
        std=data.std,
        world_size=runtime.world_size,
        all_gather=runtime.all_gather,
        batches=batches,
        has_val=data.val is not None,
        input_size=data.input_size,
    )


def teacher_source(
    network: nn.Module,
    config: RunConfig,
    data: TrainingData,
    runtime: Runtime,
    normalization: Normalization | None = None,
    resize: Resize | None = None,
) -> FrozenTeacher:
    """The frozen teacher on the training device, fed in its own ``normalization`` (None: the data set's)
    at its own input size (``resize``; None: the student's); behind a table of its logits with ``train.cache_teacher``."""
    network = runtime.place(network, config.train)
    own = normalization is not None and tuple(map(tuple, normalization)) != (tuple(data.mean), tuple(data.std))
    renormalize = Renormalization((data.mean, data.std), normalization) if own else None
    if not config.train.cache_teacher:
        return FrozenTeacher(network, renormalize, resize, compile=partial(compiled, mode=config.train.compile_mode) if config.train.compile else None)
    assert resize is None  # resolve_run refuses a cache for timm teachers, the only ones resized
    assert config.teacher is not None  # RunConfig refuses a cache without a teacher
    codec = teacher_codec(config)
    key = cache_key(config.teacher, data.train, data.augment, seed=config.train.seed, precision=str(runtime.autocast_dtype), codec=codec)
    return CachedTeacher(
        network,
        teacher_path=config.teacher,
        key=key,
        num_samples=len(data.train),
        per_epoch=data.augment.is_random,
        codec=codec,
        renormalize=renormalize,
        all_reduce_sum=runtime.all_reduce_sum,
        writes=runtime.is_main,
    )


def teacher_codec(config: RunConfig) -> LogitCodec:
    """How the cache keeps a row: every logit by ``cache_teacher_codec``, or the top k with the tail exact at the
    method's temperature (``cache_teacher_temperature`` overrides; a method without one is read at temperature 1)."""
    train = config.train
    if train.cache_teacher_topk is None:
        return CODECS[train.cache_teacher_codec or DEFAULT_CACHE_CODEC]()
    temperature = train.cache_teacher_temperature or float(config.method.params.get("temperature", 1.0))
    return TopKLogits(train.cache_teacher_topk, temperature)


def teacher_lineage(path: Path) -> dict[str, Any]:
    """What a student records about its teacher: the file's digest, architecture, accuracy, and its own lineage."""
    if is_timm_teacher(path):  # pretrained weights: timm's reference names them
        return {"teacher": {"timm": str(path).removeprefix(TIMM_PREFIX)}}
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


def check_batches(student: nn.Module, model_name: str, data: TrainingData, train: TrainConfig, runtime: Runtime) -> None:
    """Refuse an epoch without a step, and batches of one sample for a model with batch norm (it cannot train on them)."""
    per_rank = micro_batch_size(train, runtime)
    has_batch_norm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in student.modules())
    if per_rank == 1 and has_batch_norm:
        split = f" in {train.accumulate_steps} micro-batches" if train.accumulate_steps > 1 else ""
        raise UsageError(
            f"train.batch_size {train.batch_size}{split} gives each process batches of 1 sample; "
            f"the batch-norm layers of {model_name} need at least 2 to train"
        )
    if len(training_loader(data, train, runtime)) == 0:
        raise UsageError(
            f"the training split holds {len(data.train)} sample(s) per epoch, too few for one batch "
            "(a final batch of one is dropped): lower data.val_split or use more data"
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
    teacher_normalization: Normalization | None = None,
    teacher_resize: Resize | None = None,
    record_hooks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> TrainingParts:
    """Student, teacher source, method and trainer; the student draws its initialization from the run's seed.

    ``teacher_normalization``: the (mean, std) the teacher was trained with (None: the data set's);
    ``teacher_resize``: what brings the student's inputs to the teacher's input size (None: none needed).
    """
    config = spec.config
    torch.manual_seed(config.train.seed)
    student = runtime.place(new_model(spec.model_name, num_classes=bundle.num_classes, input_size=bundle.input_size), config.train)
    student = with_sync_batch_norm(student, config.train, runtime)
    data = training_data(bundle, config.data)
    check_batches(student, spec.model_name, data, config.train, runtime)
    source = None if teacher is None else teacher_source(teacher, config, data, runtime, teacher_normalization, teacher_resize)
    method = spec.method(spec.params, student=student, teacher=source, context=method_context(config, data, runtime, bundle.num_classes))
    observers: dict[str, EpochObserver] = {"teacher_cache": source} if isinstance(source, CachedTeacher) else {}
    trainer = Trainer(
        method, data, config, runtime, run_dir, checkpoint_template(spec, bundle), show_progress=show_progress, observers=observers,
        record_hooks=record_hooks,
    )
    return TrainingParts(data, source, method, trainer)
