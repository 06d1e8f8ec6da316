"""``teach`` and ``distill``: one job, since both train a network with a method."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console

from kdcli.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info
from kdcli.config import RunConfig, format_validation_error, load_resolved_config
from kdcli.data.bundle import DataBundle
from kdcli.engine import Runtime, Trainer, TrainingData, method_context, predict, prepare_student, prepare_teacher, setup_runtime
from kdcli.errors import UsageError
from kdcli.jobs.common import check_fits, load_data, model_from_checkpoint, new_model, require_model, training_data
from kdcli.jobs.teacher_relation import TeacherRelation
from kdcli.method import Method, MethodParams
from kdcli.metrics import classification_report, topk_accuracy
from kdcli.registry import get_method
from kdcli.rundir import RunDir, existing_run_dir, prepare_run_dir
from kdcli.teacher_cache import CachedTeacher, cache_key

DEFAULT_MODELS = {"teach": "cifar_resnet20", "distill": "cifar_resnet8"}


@dataclass
class TrainingSummary:
    run_dir: Path
    is_main: bool
    config: RunConfig
    history: list[dict[str, Any]]
    best_epoch: int | None
    test: dict[str, float]
    teacher_test: dict[str, float] | None
    teacher_arch: str | None
    teacher_relation: TeacherRelation | None = None
    teacher_clean: TeacherCheck | None = None

    @property
    def skipped_steps(self) -> int:
        """Steps whose update ``train.nonfinite_loss = skip`` dropped."""
        return sum(record["skipped_steps"] for record in self.history)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "job": self.config.job,
            "method": self.config.method.name,
            "model": self.config.model.name,
            "teacher": str(self.config.teacher) if self.config.teacher else None,
            "teacher_arch": self.teacher_arch,
            "epochs": len(self.history),
            "final_epoch": self.history[-1] if self.history else None,
            "best_epoch": self.best_epoch,
            "skipped_steps": self.skipped_steps,
            "test": self.test,
            "teacher_test": self.teacher_test,
            "teacher_relation": None if self.teacher_relation is None else self.teacher_relation.as_dict(),
            "teacher_clean": None if self.teacher_clean is None else asdict(self.teacher_clean),
        }


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher's clean accuracy, measured before training: a weak teacher hurts its students."""

    split: str
    top1: float
    min_top1: float

    @property
    def weak(self) -> bool:
        return self.top1 < self.min_top1


def check_teacher(teacher: torch.nn.Module, data: TrainingData, bundle: DataBundle, config: RunConfig, runtime: Runtime) -> TeacherCheck:
    """Clean top-1 on the run's validation split (the test split when there is none)."""
    split, samples = ("val", data.val) if data.val is not None else ("test", bundle.test)
    logits = predict(teacher, samples, mean=bundle.mean, std=bundle.std, device=runtime.device, batch_size=config.train.eval_batch_size)
    chance = 1.0 / bundle.num_classes
    min_top1 = config.teacher_min_top1 if config.teacher_min_top1 is not None else (1.0 + chance) / 2
    return TeacherCheck(split=split, top1=topk_accuracy(logits, samples.targets, 1), min_top1=min_top1)


def print_teacher_check(check: TeacherCheck, arch: str | None, *, verbose: bool) -> None:
    console = Console(stderr=True, highlight=False)
    if verbose:
        console.print(f"teacher {arch}: clean {check.split} top-1 {check.top1:.4f}", markup=False)
    if check.weak:
        console.print(
            f"warning: the teacher's clean {check.split} top-1 {check.top1:.4f} is below {check.min_top1:.4f} "
            "(teacher_min_top1); a weak teacher hurts distillation: consider a better-trained checkpoint",
            markup=False,
            soft_wrap=True,
        )


def resolve_config(config: RunConfig) -> tuple[RunConfig, type[Method], MethodParams]:
    """Fill job defaults and check that method, role and teacher fit together."""
    method_cls = get_method(config.method.name)
    if config.job not in method_cls.roles:
        other = "distill" if config.job == "teach" else "teach"
        raise UsageError(f"method {config.method.name!r} is not a {config.job} method; use kdcli {other} --method {config.method.name}")
    note = f" ({method_cls.teacher_note})" if method_cls.teacher_note else ""
    if method_cls.teacher_use == "required" and config.teacher is None:
        raise UsageError(f"method {config.method.name!r} needs a teacher{note}: pass --teacher CKPT.safetensors")
    if method_cls.teacher_use == "none" and config.teacher is not None:
        raise UsageError(f"method {config.method.name!r} uses no teacher network{note}; drop --teacher")
    try:
        params = method_cls.Params.model_validate(config.method.params)
    except ValidationError as exc:
        raise UsageError(f"invalid method hyperparameters: {format_validation_error(exc, prefix='method')}") from None
    model_name = config.model.name or default_model_name(config, method_cls)
    resolved = config.model_copy(
        update={
            "model": config.model.model_copy(update={"name": model_name}),
            "method": config.method.model_validate({"name": config.method.name, **params.model_dump(mode="json")}),
        }
    )
    return resolved, method_cls, params


def cached_teacher(teacher: torch.nn.Module, teacher_path: Path, data: TrainingData, seed: int, runtime: Runtime) -> CachedTeacher:
    """The teacher behind a table of its logits on the training split (``--cache-teacher``)."""
    key = cache_key(teacher_path, data.train, data.augment, seed=seed, precision=str(runtime.autocast_dtype))
    return CachedTeacher(
        teacher,
        teacher_path=teacher_path,
        key=key,
        num_samples=len(data.train),
        per_epoch=data.augment.is_random,
        all_reduce_sum=runtime.all_reduce_sum,
        writes=runtime.is_main,
    )


def default_model_name(config: RunConfig, method_cls: type[Method]) -> str:
    """The student when ``--model`` is not given: the teacher's architecture for self-distillation."""
    if method_cls.student_defaults_to_teacher_arch and config.teacher is not None:
        return read_checkpoint_info(config.teacher).arch
    return DEFAULT_MODELS[config.job]


def run_training(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    bundle: DataBundle | None = None,
) -> TrainingSummary:
    """Train ``config.model`` with ``config.method`` into run directory ``out``.

    With ``resume`` the run's saved config replaces ``config`` and training
    continues from the saved state: after the last completed epoch, or at the
    exact step where a signal stopped it; with no state saved yet it starts
    over.  Everything that can be wrong with the input is checked before the
    run directory is touched.
    ``bundle`` is the data set of ``config.data`` when the caller has already
    loaded it (a sweep trains many runs on one data set).
    """
    if resume:
        run_dir = existing_run_dir(out)
        config = load_resolved_config(run_dir.config_path)
    config, method_cls, params = resolve_config(config)
    assert config.model.name is not None  # resolve_config fills the job's default
    require_model(config.model.name)
    if bundle is None:
        bundle = load_data(config.data)
    teacher: torch.nn.Module | None = None
    teacher_info: CheckpointInfo | None = None
    if config.teacher is not None:
        teacher, teacher_info = model_from_checkpoint(config.teacher)
        check_fits(teacher_info, bundle, config.teacher)
    runtime = setup_runtime(config.train)
    if resume:
        if runtime.is_main:
            run_dir.remove_partial_writes()
    else:
        run_dir = prepare_run_dir(out, overwrite=overwrite) if runtime.is_main else RunDir(out)
        if runtime.is_main:
            run_dir.write_config(config.model_dump(mode="json"))

    torch.manual_seed(config.train.seed)
    student = new_model(config.model.name, num_classes=bundle.num_classes, input_size=bundle.input_size)
    data = training_data(bundle, config.data)
    teacher_cache = None
    if teacher is not None:
        teacher = prepare_teacher(teacher, runtime, config.train)
        if config.train.cache_teacher:
            teacher_cache = cached_teacher(teacher, config.teacher, data, config.train.seed, runtime)
    method = method_cls(
        params,
        student=prepare_student(student, runtime, config.train),
        teacher=teacher if teacher_cache is None else teacher_cache,
        context=method_context(config, data, runtime, bundle.num_classes),
    )
    template = CheckpointInfo(
        arch=config.model.name,
        num_classes=bundle.num_classes,
        input_size=bundle.input_size,
        mean=bundle.mean,
        std=bundle.std,
        method=config.method.name,
        epoch=0,
        data=config.data.model_dump(mode="json"),
        config=config.model_dump(mode="json"),
    )
    trainer = Trainer(method, data, config, runtime, run_dir, template, show_progress=show_progress, teacher_cache=teacher_cache)
    if resume:
        trainer.resume()
    teacher_clean = None
    if teacher is not None and teacher_info is not None:
        teacher_clean = check_teacher(teacher, data, bundle, config, runtime)
        if runtime.is_main:
            print_teacher_check(teacher_clean, teacher_info.arch, verbose=show_progress)
    history = trainer.fit()
    if config.train.keep_best:
        # The deployable result of a run with model selection is its best epoch, not its last.
        best_weights, _ = load_checkpoint(run_dir.best_path)
        trainer.student.load_state_dict(best_weights)

    def test_report(model: torch.nn.Module) -> dict[str, float]:
        logits = predict(model, bundle.test, mean=bundle.mean, std=bundle.std, device=runtime.device, batch_size=config.train.eval_batch_size)
        return classification_report(logits, bundle.test.targets)

    test = test_report(trainer.student)
    teacher_test: dict[str, float] | None = None
    relation: TeacherRelation | None = None
    if teacher is not None and teacher_info is not None:
        teacher_test = test_report(teacher)
        relation = TeacherRelation.of(
            teacher, teacher_info, trainer.student, config.model.name, teacher_test["top1"], test["top1"]
        )
    summary = TrainingSummary(
        run_dir=run_dir.root,
        is_main=runtime.is_main,
        config=config,
        history=history,
        best_epoch=trainer.best["epoch"] if config.train.keep_best else None,
        test=test,
        teacher_test=teacher_test,
        teacher_arch=None if teacher_info is None else teacher_info.arch,
        teacher_relation=relation,
        teacher_clean=teacher_clean,
    )
    runtime.shutdown()
    return summary
