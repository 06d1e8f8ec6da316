"""``teach`` and ``distill``: one job, since both train a network with a method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from kdcli.checkpoint import CheckpointInfo, load_checkpoint, load_state
from kdcli.config import RunConfig, format_validation_error, load_resolved_config
from kdcli.data.bundle import DataBundle
from kdcli.engine import Trainer, method_context, predict, prepare_student, prepare_teacher, setup_runtime
from kdcli.errors import UsageError
from kdcli.jobs.common import check_fits, load_data, model_from_checkpoint, training_data
from kdcli.method import Method, MethodParams
from kdcli.metrics import classification_report
from kdcli.models import create_model
from kdcli.registry import get_method, load_model_plugins
from kdcli.rundir import RunDir, existing_run_dir, prepare_run_dir

DEFAULT_MODELS = {"teach": "cifar_resnet20", "distill": "cifar_resnet8"}


@dataclass
class TrainingSummary:
    run_dir: Path
    config: RunConfig
    history: list[dict[str, Any]]
    best_epoch: int | None
    test: dict[str, float]
    teacher_test: dict[str, float] | None
    teacher_arch: str | None

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
            "test": self.test,
            "teacher_test": self.teacher_test,
        }


def resolve_config(config: RunConfig) -> tuple[RunConfig, type[Method], MethodParams]:
    """Fill job defaults and check that method, role and teacher fit together."""
    method_cls = get_method(config.method.name)
    if config.job not in method_cls.roles:
        other = "distill" if config.job == "teach" else "teach"
        raise UsageError(f"method {config.method.name!r} is not a {config.job} method; use kdcli {other} --method {config.method.name}")
    if method_cls.teacher_use == "required" and config.teacher is None:
        raise UsageError(f"method {config.method.name!r} needs a teacher: pass --teacher CKPT.safetensors")
    if method_cls.teacher_use == "none" and config.teacher is not None:
        raise UsageError(f"method {config.method.name!r} uses no teacher network; drop --teacher")
    try:
        params = method_cls.Params.model_validate(config.method.params)
    except ValidationError as exc:
        raise UsageError(f"invalid method hyperparameters: {format_validation_error(exc, prefix='method')}") from None
    model_name = config.model.name or DEFAULT_MODELS[config.job]
    resolved = config.model_copy(
        update={
            "model": config.model.model_copy(update={"name": model_name}),
            "method": config.method.model_validate({"name": config.method.name, **params.model_dump(mode="json")}),
        }
    )
    return resolved, method_cls, params


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
    continues after the last completed epoch.  Everything that can be wrong
    with the input is checked before the run directory is touched.  ``bundle``
    is the data set of ``config.data`` when the caller has already loaded it
    (a sweep trains many runs on one data set).
    """
    if resume:
        run_dir = existing_run_dir(out)
        config = load_resolved_config(run_dir.config_path)
    config, method_cls, params = resolve_config(config)
    load_model_plugins()
    if bundle is None:
        bundle = load_data(config.data)
    teacher_arch = None
    teacher = None
    if config.teacher is not None:
        teacher, teacher_info = model_from_checkpoint(config.teacher)
        check_fits(teacher_info, bundle, config.teacher)
        teacher_arch = teacher_info.arch
    runtime = setup_runtime(config.train)
    if resume:
        resume_state = load_state(run_dir.resume_path)
    else:
        resume_state = None
        run_dir = prepare_run_dir(out, overwrite=overwrite) if runtime.is_main else RunDir(out)
        if runtime.is_main:
            run_dir.write_config(config.model_dump(mode="json"))

    torch.manual_seed(config.train.seed)
    student = create_model(config.model.name, num_classes=bundle.num_classes, input_size=bundle.input_size)
    data = training_data(bundle, config.data)
    method = method_cls(
        params,
        student=prepare_student(student, runtime, config.train),
        teacher=None if teacher is None else prepare_teacher(teacher, runtime, config.train),
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
    trainer = Trainer(method, data, config, runtime, run_dir, template, show_progress=show_progress)
    if resume_state is not None:
        trainer.restore(resume_state)
    history = trainer.fit()
    if config.train.keep_best:
        # The deployable result of a run with model selection is its best epoch, not its last.
        best_weights, _ = load_checkpoint(run_dir.best_path)
        trainer.student.load_state_dict(best_weights)

    def test_report(model: torch.nn.Module) -> dict[str, float]:
        logits = predict(model, bundle.test, mean=bundle.mean, std=bundle.std, device=runtime.device, batch_size=config.train.eval_batch_size)
        return classification_report(logits, bundle.test.targets)

    return TrainingSummary(
        run_dir=run_dir.root,
        config=config,
        history=history,
        best_epoch=trainer.best["epoch"] if config.train.keep_best else None,
        test=test_report(trainer.student),
        teacher_test=None if teacher is None else test_report(method.teacher),
        teacher_arch=teacher_arch,
    )
