"""``teach`` and ``distill``: one job, since both train a network with a method."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from kdcli.checkpoint import CheckpointInfo, load_checkpoint
from kdcli.config import RunConfig, load_resolved_config
from kdcli.data.bundle import DataBundle, ImageSplit
from kdcli.data.memory import require_memory
from kdcli.data.stream import FileSplit
from kdcli.inference import predict
from kdcli.jobs.build import RunSpec, TrainingParts, build_training, resolve_run
from kdcli.jobs.common import check_fits, is_timm_teacher, load_data, load_teacher, pretrained_resize, require_model, training_data
from kdcli.jobs.teacher_relation import TeacherRelation
from kdcli.metrics import classification_report, topk_accuracy
from kdcli.errors import UsageError
from kdcli.loggers import LoggerHub, LoggerRun, RunLogger
from kdcli.registry import get_logger
from kdcli.rundir import RunDir, RunDirExists, existing_run_dir, plan_run_dir
from kdcli.runtime import Runtime, runtime_for
from kdcli.teacher import Normalization, Resize

Notify = Callable[[str], None]  # where a job's notes go (the CLI prints them on stderr)


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher's clean accuracy, measured before training: a weak teacher hurts its students."""

    arch: str
    split: str
    top1: float
    min_top1: float

    @property
    def weak(self) -> bool:
        return self.top1 < self.min_top1

    def recorded_in(self, info: CheckpointInfo) -> CheckpointInfo:
        """The student's checkpoint metadata with this clean accuracy in its teacher lineage."""
        teacher = info.lineage.get("teacher", {}) | {"clean_top1": self.top1, "clean_split": self.split}
        return replace(info, lineage=info.lineage | {"teacher": teacher})

    def lines(self, *, verbose: bool) -> list[str]:
        lines = [f"teacher {self.arch}: clean {self.split} top-1 {self.top1:.4f}"] if verbose else []
        if self.weak:
            lines.append(
                f"warning: the teacher's clean {self.split} top-1 {self.top1:.4f} is below {self.min_top1:.4f} "
                "(teacher_min_top1); a weak teacher hurts distillation: consider a better-trained checkpoint"
            )
        return lines


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
        clean = None if self.teacher_clean is None else {key: value for key, value in asdict(self.teacher_clean).items() if key != "arch"}
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
            "teacher_clean": clean,
        }


def run_training(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    notify: Notify | None = None,
) -> TrainingSummary:
    """Train ``config.model`` with ``config.method`` into run directory ``out``.

    With ``resume`` the run's saved config (of the same job) replaces ``config`` and training
    continues from the saved state: after the last completed epoch, or at the
    exact step where a signal stopped it; with no state saved yet it starts
    over.  Everything that can be wrong with the input is checked before the
    run directory is touched.
    """
    if resume:
        saved = load_resolved_config(existing_run_dir(out).config_path)
        if saved.job != config.job:
            raise UsageError(f"{out} is a {saved.job} run; continue it with kdcli {saved.job} --resume {out}")
        config = saved
    return train(resolve_run(config), out, resume=resume, overwrite=overwrite, show_progress=show_progress, notify=notify)


def plan_training(config: RunConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """What ``run_training`` would do, checked as far as it goes without writing: the resolved config and the plan.

    Every default is filled in, the data set's augmentation recipe included;
    nothing is written and no network is trained.
    """
    spec = resolve_run(config)
    require_model(spec.model_name)
    bundle = load_data(spec.config.data)
    teacher = None
    if spec.config.teacher is not None:
        teacher = load_teacher(spec.config.teacher, network=False)[1]  # a dry run never uses the network
        _check_teacher_fits(teacher, bundle, spec.config.teacher)
        _check_teacher_input_memory(spec.config, teacher)
    replaces = _new_run_dir(out, spec.config, overwrite=overwrite).replaces
    data = training_data(bundle, spec.config.data)
    recipe = {key: value for key, value in data.augment.facts().items() if key in ("crop_padding", "hflip")}
    resolved = spec.config.model_copy(update={"data": spec.config.data.model_copy(update=recipe)})
    per_epoch = -(-len(data.train) // spec.config.train.batch_size)
    return {
        "config": resolved.model_dump(mode="json"),
        "plan": {
            "run_dir": str(out),
            "action": "replace" if replaces is not None else "create",
            "model": spec.model_name,
            "teacher": None if teacher is None else {"path": str(spec.config.teacher), "arch": teacher.arch, "epoch": teacher.epoch},
            "data": {
                "name": bundle.name, "num_classes": bundle.num_classes, "input_size": list(bundle.input_size),
                "mean": list(bundle.mean), "std": list(bundle.std),
                "num_train": len(data.train), "num_val": 0 if data.val is None else len(data.val), "num_test": len(bundle.test),
                **data_storage(bundle),
            },
            "steps_per_epoch": per_epoch,
            "total_steps": per_epoch * spec.config.train.epochs,
        },
    }


def data_storage(bundle: DataBundle) -> dict[str, Any]:
    """Whether the splits are held in memory (decoded uint8, with their size) or streamed from files (by how many workers)."""
    splits = (bundle.train, bundle.test)
    if all(isinstance(split, ImageSplit) for split in splits):
        size = sum(split.images.numel() * split.images.element_size() for split in splits)
        return {"storage": "in memory", "memory_bytes": size}
    workers = max(split.workers for split in splits if isinstance(split, FileSplit))
    return {"storage": "streamed from files", "workers": workers}


def _check_teacher_fits(info: CheckpointInfo, bundle: DataBundle, source: Path) -> None:
    try:
        check_fits(info, bundle, source, any_image_size=is_timm_teacher(source))
    except UsageError as exc:
        raise UsageError(f"{exc}; distill takes the teacher's data set unless --data or --set data.* change it") from None


def _check_teacher_input_memory(config: RunConfig, info: CheckpointInfo) -> None:
    """A timm teacher resizes each batch to its pretrained input size: that batch (and its renormalized copy) must fit."""
    if config.teacher is None or not is_timm_teacher(config.teacher) or config.train.teacher_resize == "off":
        return
    channels, height, width = info.input_size
    batch = max(config.train.batch_size, config.train.eval_batch_size)
    needed = 2 * batch * channels * height * width * 4  # float32, resized and renormalized
    require_memory(f"the timm teacher's {height}x{width} input at batch size {batch}", needed, "train.batch_size, train.eval_batch_size or set train.teacher_resize=off")


def train(
    spec: RunSpec,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    notify: Notify | None = None,
    bundle: DataBundle | None = None,
) -> TrainingSummary:
    """Build the run once, fit it, report on the test split; the process group is left however it ends.

    ``bundle`` is the data set of the config when the caller has already
    loaded it (a sweep trains many runs on one data set).
    """
    config = spec.config
    require_model(spec.model_name)
    bundle = bundle if bundle is not None else load_data(config.data)
    if bundle.unreadable and notify is not None:
        notify(f"warning: left out {len(bundle.unreadable)} training images that do not decode, e.g. {bundle.unreadable[0]}")
    for note in bundle.notes if notify is not None else ():
        notify(note)
    teacher, teacher_info = None, None
    if config.teacher is not None:
        teacher, teacher_info = load_teacher(config.teacher)
        _check_teacher_fits(teacher_info, bundle, config.teacher)
        _check_teacher_input_memory(config, teacher_info)
    with runtime_for(config.train) as runtime:
        run_dir = _plan_run_dir(out, config, runtime, resume=resume, overwrite=overwrite)
        hub: LoggerHub | None = None
        summary = None
        try:
            # Built before the run directory is made: a wrong method argument must leave nothing on disk.
            normalization = None if teacher_info is None else (teacher_info.mean, teacher_info.std)
            parts = build_training(
                spec, bundle, teacher, runtime, run_dir, show_progress=show_progress, teacher_normalization=normalization,
                teacher_resize=_teacher_resize(config, teacher, teacher_info, bundle),
                record_hooks=(lambda record: hub.log_epoch(record) if hub is not None else None,),
            )
            if resume:
                parts.trainer.resume()
            teacher_clean = _checked_teacher(parts, teacher_info, bundle, runtime, show_progress, notify)
            if not resume and runtime.is_main:
                run_dir.create()
                run_dir.write_config(config.model_dump(mode="json"))
            hub = open_loggers(config, run_dir, resume, notify) if runtime.is_main else None
            try:
                history = parts.trainer.fit()
            except BaseException:
                run_dir.discard_staged()  # a replacement that never saved a state leaves the old run as it was
                raise
            summary = _summarize(spec, parts, history, bundle, runtime, run_dir, teacher_info, teacher_clean)
            if runtime.is_main:
                run_dir.write_summary(summary.as_dict())
            return summary
        finally:
            if hub is not None:
                hub.finish(None if summary is None else summary.as_dict())
                hub.close()


def _teacher_resize(config: RunConfig, teacher: nn.Module | None, info: CheckpointInfo | None, bundle: DataBundle) -> Resize | None:
    """A timm teacher sees its pretrained input size (``train.teacher_resize=auto``); a kdcli checkpoint has the data set's."""
    if teacher is None or info is None or config.teacher is None or not is_timm_teacher(config.teacher):
        return None
    return None if config.train.teacher_resize == "off" else pretrained_resize(teacher, info, bundle.input_size)


def _checked_teacher(
    parts: TrainingParts, info: CheckpointInfo | None, bundle: DataBundle, runtime: Runtime, show_progress: bool, notify: Notify | None
) -> TeacherCheck | None:
    """The teacher's clean accuracy, noted (and recorded in the student's checkpoints) before training."""
    if parts.teacher is None or info is None:
        return None
    check = check_teacher(parts.teacher.network, info, parts, bundle, runtime)
    parts.trainer.checkpoint_template = check.recorded_in(parts.trainer.checkpoint_template)
    for line in check.lines(verbose=show_progress) if runtime.is_main and notify else []:
        notify(line)
    return check


def open_loggers(config: RunConfig, run_dir: RunDir, resumed: bool, notify: Notify | None) -> LoggerHub | None:
    """The run's ``log.to`` trackers, started with the resolved config; None when there are none."""
    if not config.log.to:
        return None
    warn = notify or (lambda line: print(line, file=sys.stderr))
    hub = LoggerHub({name: _logger_factory(name) for name in config.log.to}, warn)
    name = config.log.name or run_dir.root.resolve().name
    hub.start(LoggerRun(run_dir.root, name, config.log.project, config.model_dump(mode="json"), resumed))
    return hub


def _logger_factory(name: str) -> Callable[[], RunLogger]:
    return lambda: get_logger(name)()


def _plan_run_dir(out: Path, config: RunConfig, runtime: Runtime, *, resume: bool, overwrite: bool) -> RunDir:
    """The run directory, not yet touched: cleaned of cut-short writes when resuming, else planned (rank 0 creates it)."""
    if resume:
        run_dir = existing_run_dir(out)
        if runtime.is_main:
            run_dir.remove_partial_writes()
        return run_dir
    if not runtime.is_main:
        return RunDir(out)
    return _new_run_dir(out, config, overwrite=overwrite)


def _new_run_dir(out: Path, config: RunConfig, *, overwrite: bool) -> RunDir:
    reads = () if config.teacher is None or is_timm_teacher(config.teacher) else (config.teacher,)
    try:
        return plan_run_dir(out, overwrite=overwrite, reads=reads)
    except RunDirExists as exc:
        raise UsageError(f"{exc}; pass --resume {out} to continue it or --overwrite to replace it") from None


def check_teacher(teacher: nn.Module, info: CheckpointInfo, parts: TrainingParts, bundle: DataBundle, runtime: Runtime) -> TeacherCheck:
    """Clean top-1 on the run's validation split (the test split when there is none), as the teacher sees inputs in training."""
    config = parts.trainer.config
    split, samples = ("val", parts.data.val) if parts.data.val is not None else ("test", bundle.test)
    resize = None if parts.teacher is None else parts.teacher.resize
    logits = _logits(teacher, samples, (info.mean, info.std), runtime, config.train.eval_batch_size, resize)
    chance = 1.0 / bundle.num_classes
    min_top1 = config.teacher_min_top1 if config.teacher_min_top1 is not None else (1.0 + chance) / 2
    return TeacherCheck(arch=info.arch, split=split, top1=topk_accuracy(logits, samples.targets, 1), min_top1=min_top1)


def _logits(
    model: nn.Module, samples: ImageSplit, normalization: Normalization, runtime: Runtime, batch_size: int, resize: Resize | None = None
) -> Any:
    mean, std = normalization
    transform = None if resize is None else lambda inputs, index: resize(inputs)
    return predict(model, samples, mean=mean, std=std, device=runtime.device, batch_size=batch_size, transform=transform)


def _summarize(
    spec: RunSpec,
    parts: TrainingParts,
    history: list[dict[str, Any]],
    bundle: DataBundle,
    runtime: Runtime,
    run_dir: RunDir,
    teacher_info: CheckpointInfo | None,
    teacher_clean: TeacherCheck | None,
) -> TrainingSummary:
    """Test-split reports of the deployable student (the best epoch with model selection) and the teacher."""
    config, trainer = spec.config, parts.trainer
    if config.train.keep_best:
        trainer.student.load_state_dict(load_checkpoint(run_dir.best_path)[0])
    batch_size = config.train.eval_batch_size
    test = classification_report(_logits(trainer.student, bundle.test, (bundle.mean, bundle.std), runtime, batch_size), bundle.test.targets)
    teacher_test, relation = None, None
    if parts.teacher is not None and teacher_info is not None:
        teacher = parts.teacher.network
        own = (teacher_info.mean, teacher_info.std)
        teacher_logits = _logits(teacher, bundle.test, own, runtime, batch_size, parts.teacher.resize)
        teacher_test = classification_report(teacher_logits, bundle.test.targets)
        relation = TeacherRelation.of(
            teacher, teacher_info, trainer.student, spec.model_name, teacher_test["top1"], test["top1"], len(bundle.test)
        )
    return TrainingSummary(
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
