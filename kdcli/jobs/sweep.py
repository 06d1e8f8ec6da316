"""``sweep-checkpoints``: distill a student from every saved checkpoint of one or more teacher runs.

Every student follows the same recipe, so the sweep shows how the student's
accuracy depends on the teacher checkpoint it learned from, next to the
teacher's own accuracy (the SoTeacher paper's Figure 1, on any data).

Sweep directory::

    SWEEP_DIR/sweep.json                       the recipe; a rerun must use the same one
    SWEEP_DIR/students/LABEL/epoch_NNNN/       one distill run per teacher checkpoint
    SWEEP_DIR/students/LABEL/epoch_NNNN/entry.json   written when that entry is finished
    SWEEP_DIR/results.csv, results.json, sweep.png

Rerunning the same command continues an interrupted sweep: finished entries
are read back, an interrupted student run resumes after its last epoch.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.checkpoint import TEMPORARY_PATTERN, atomic_write_bytes, check_target, read_checkpoint_info
from kdcli.config import build_config, load_resolved_config
from kdcli.data.bundle import DataBundle
from kdcli.errors import KdcliError, UsageError
from kdcli.jobs.common import DATA_LOCATION_KEYS, load_data
from kdcli.jobs.evaluate import evaluate_checkpoint
from kdcli.jobs.build import RunSpec, resolve_run
from kdcli.jobs.train import Notify, TrainingSummary, train
from kdcli.registry import get_method
from kdcli.results import aggregate, read_json, seed_dir
from kdcli.rundir import RunDir, check_replaceable, is_kdcli_run, remove_run

SWEEP_FORMAT = "kdcli-sweep"
INTERRUPTED = 130  # the exit code of an interrupted run
SWEEP_FILES = ("sweep.json", "results.csv", "results.json", "sweep.png")
COLUMNS = (
    "teacher", "teacher_epoch", "teacher_top1", "teacher_ece", "teacher_nll",
    "teacher_pstar_tv_train", "teacher_pstar_sq_l2_train",
    "student_top1", "student_ece", "student_nll", "teacher_checkpoint", "student_run",
)
STUDENT_METRICS = ("student_top1", "student_ece", "student_nll")


@dataclass(frozen=True)
class TeacherRun:
    """A teacher run directory, the label it gets in the results, and the checkpoints to distill from."""

    label: str
    root: Path
    checkpoints: tuple[Path, ...]


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]
    plot_written: bool

    def as_dict(self) -> dict[str, Any]:
        return {"sweep_dir": str(self.out), "plot": self.plot_written, "entries": self.rows}


EntryCallback = Callable[[dict[str, Any], int, int], None]


def find_teacher_runs(roots: list[Path], every: int) -> list[TeacherRun]:
    """Each run's saved checkpoints, every ``every``-th counted back from the last (always included)."""
    if every < 1:
        raise UsageError(f"--every must be at least 1 (got {every})")
    if not roots:
        raise UsageError("give at least one teacher run directory")
    labels = [root.resolve().name for root in roots]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UsageError(f"teacher run directories label the results, so their names must differ: {', '.join(duplicates)}")
    runs = []
    for label, root in zip(labels, roots):
        saved = RunDir(root).saved_checkpoints()
        if not saved:
            raise UsageError(f"{root} holds no saved teacher checkpoints (checkpoints/epoch_*.safetensors); is it a kdcli teach run?")
        runs.append(TeacherRun(label, root, tuple(saved[::-1][::every][::-1])))
    return runs


def teacher_data(runs: list[TeacherRun]) -> dict[str, Any]:
    """The data config the teachers were trained on; the students learn on the same data."""
    configs = [load_resolved_config(RunDir(run.root).config_path).data.model_dump(mode="json") for run in runs]
    identities = [_data_identity(config) for config in configs]
    if any(identity != identities[0] for identity in identities):
        raise UsageError("the teacher runs were trained on different data configs; a sweep compares teachers on one data set")
    # Where the data lives comes from this command only, never from a file it reads.
    return _data_identity(configs[0])


def _data_identity(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in DATA_LOCATION_KEYS}


def build_recipe(runs: list[TeacherRun], *, file: Path | None, flags: dict[str, Any], overrides: list[str]) -> RunSpec:
    """The distill config shared by every student: defaults < file < flags < ``--set``.

    The data defaults to the teachers' and may only be moved (``root``,
    ``download``).  Students keep only their last checkpoint unless
    ``train.save_every`` says otherwise: a sweep trains many of them.
    """
    data = teacher_data(runs)
    defaults: dict[str, Any] = {"data": data}
    flags = flags | {"job": "distill"}
    config = build_config(defaults=defaults, file=file, flags=flags, overrides=overrides)
    defaults["train"] = {"save_every": config.train.epochs}
    config = build_config(defaults=defaults, file=file, flags=flags, overrides=overrides)
    if _data_identity(config.data.model_dump(mode="json")) != _data_identity(data):
        raise UsageError("a sweep distills on the data its teachers were trained on; only data.root and --download may change")
    if get_method(config.method.name).teacher_use == "none":
        raise UsageError(f"method {config.method.name!r} uses no teacher; a sweep distills from teacher checkpoints (e.g. --method kd)")
    # Resolved once, with the first checkpoint: a wrong method or hyperparameter fails before any training.
    return resolve_run(config.model_copy(update={"teacher": runs[0].checkpoints[-1]})).with_teacher(None)


def prepare_sweep_dir(out: Path, recipe: RunSpec, *, overwrite: bool, reads: tuple[Path, ...] = ()) -> None:
    """A new sweep directory, or the same sweep's directory to continue; replacing one spares ``reads`` and the user's files."""
    manifest = out / "sweep.json"
    record = {"format": SWEEP_FORMAT, "recipe": recipe.config.model_dump(mode="json")}
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    for name in SWEEP_FILES:  # what the sweep writes at its end: a link there is refused before training
        check_target(out / name, reads=reads)
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not manifest.is_file():
            raise UsageError(f"{out} exists and is not a kdcli sweep directory; choose another --out or pass --overwrite")
        saved = read_json(manifest, "a sweep index")
        if not isinstance(saved, dict) or saved.get("format") != SWEEP_FORMAT or _comparable(saved.get("recipe", {})) != _comparable(record["recipe"]):
            raise UsageError(f"{out} holds a sweep with a different recipe; choose another --out or pass --overwrite")
        return
    if out.exists() and any(out.iterdir()):
        check_replaceable(out, reads, marker="sweep.json")
        _remove_sweep(out)
    atomic_write_bytes(manifest, (json.dumps(record, indent=2) + "\n").encode())


def _remove_sweep(out: Path) -> None:
    """Delete what a sweep wrote: its own files and its students' runs; anything else in ``out`` stays."""
    for name in SWEEP_FILES:
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(TEMPORARY_PATTERN):
        leftover.unlink()
    for entry_dir in out.glob("students/*/*"):
        if is_kdcli_run(entry_dir):
            (entry_dir / "entry.json").unlink(missing_ok=True)
            remove_run(entry_dir)
    for folder in [*out.glob("students/*"), out / "students"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    return recipe | {"data": _data_identity(recipe.get("data", {}))}


def run_sweep(
    runs: list[TeacherRun],
    recipe: RunSpec,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    on_entry: EntryCallback | None = None,
    notify: Notify | None = None,
) -> SweepResult:
    """Distill one student per selected teacher checkpoint, then write the results and the plot."""
    reads = tuple(checkpoint for run in runs for checkpoint in run.checkpoints)
    bundle = load_data(recipe.config.data)  # a data set that fails to load leaves the disk untouched
    prepare_sweep_dir(out, recipe, overwrite=overwrite, reads=reads)
    sweep = _Sweep(recipe, out, bundle, show_progress, notify)
    entries = [(run, checkpoint) for run in runs for checkpoint in run.checkpoints]
    rows = []
    for done, (run, checkpoint) in enumerate(entries, start=1):
        rows.append(sweep.entry(run, checkpoint))
        if on_entry is not None:
            on_entry(rows[-1], done, len(entries))
    write_results(out, rows)
    return SweepResult(out, rows, plot_written=write_plot(out / "sweep.png", rows))


@dataclass(frozen=True)
class _Sweep:
    """What every entry shares: the recipe, where results go, and the data set, loaded once."""

    recipe: RunSpec
    out: Path
    bundle: DataBundle
    show_progress: bool
    notify: Notify | None

    def entry(self, run: TeacherRun, checkpoint: Path) -> dict[str, Any]:
        """One row: read back when finished before, else evaluate the teacher and distill a student."""
        entry_dir = self.out / "students" / run.label / checkpoint.stem
        finished = entry_dir / "entry.json"
        if finished.is_file():
            row = read_json(finished, "a sweep entry")
            if not isinstance(row, dict) or not set(COLUMNS) <= set(row):
                raise UsageError(f"{finished} is not a kdcli sweep entry; remove it to distill that student again")
            return row
        config = self.recipe.config
        teacher = evaluate_checkpoint(
            checkpoint, data_root=config.data.root, device=config.train.device,
            batch_size=config.train.eval_batch_size, bundle=self.bundle,
        )["metrics"]
        student = self.distill(checkpoint, entry_dir).test
        row = {
            "teacher": run.label,
            "teacher_epoch": read_checkpoint_info(checkpoint).epoch,
            "teacher_top1": teacher["top1"],
            "teacher_ece": teacher["ece"],
            "teacher_nll": teacher["nll"],
            "teacher_pstar_tv_train": teacher.get("pstar_tv_train"),
            "teacher_pstar_sq_l2_train": teacher.get("pstar_sq_l2_train"),
            "student_top1": student["top1"],
            "student_ece": student["ece"],
            "student_nll": student["nll"],
            "teacher_checkpoint": str(checkpoint),
            "student_run": str(entry_dir),
        }
        atomic_write_bytes(finished, (json.dumps(row, indent=2) + "\n").encode())
        return row

    def distill(self, checkpoint: Path, entry_dir: Path) -> TrainingSummary:
        resumable = (entry_dir / "resume.safetensors").is_file()
        try:
            return train(
                self.recipe.with_teacher(checkpoint), entry_dir, resume=resumable, overwrite=not resumable,
                show_progress=self.show_progress, notify=self.notify, bundle=self.bundle,
            )
        except KdcliError as exc:
            if exc.exit_code != INTERRUPTED:
                raise
            # The student run's own hint (--resume RUN_DIR) is not how a sweep continues.
            raise KdcliError(
                f"sweep interrupted; finished entries are kept: rerun the same command with --out {self.out} to continue",
                exit_code=INTERRUPTED,
            ) from None


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "results.json", (json.dumps(rows, indent=2) + "\n").encode())


def write_plot(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Teacher and student top-1 against teacher epoch, one colour per teacher run; False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional: the ``plot`` extra
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    labels = list(dict.fromkeys(row["teacher"] for row in rows))
    for colour, label in zip(_colours(len(labels)), labels):
        points = sorted((row["teacher_epoch"], row["teacher_top1"], row["student_top1"]) for row in rows if row["teacher"] == label)
        epochs, teacher_top1, student_top1 = zip(*points)
        axes.plot(epochs, teacher_top1, linestyle="--", marker="o", color=colour, label=f"{label}: teacher")
        axes.plot(epochs, student_top1, linestyle="-", marker="s", color=colour, label=f"{label}: student")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("teacher epoch")
    axes.set_ylabel("test top-1")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    atomic_write_bytes(path, image.getvalue())
    return True


def _colours(count: int) -> list[str]:
    return [f"C{index % 10}" for index in range(count)]


@dataclass
class SeededSweepResult:
    """One sweep per training seed (``OUT/seed-N``) and, per teacher checkpoint, the students' mean ± std."""

    out: Path
    sweeps: dict[int, SweepResult]
    rows: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"sweep_dir": str(self.out), "seeds": list(self.sweeps), "entries": self.rows,
                "per_seed": {str(seed): sweep.as_dict() for seed, sweep in self.sweeps.items()}}


def run_seeded_sweep(runs: list[TeacherRun], recipe: RunSpec, out: Path, seeds: list[int], *, overwrite: bool = False, **options: Any) -> SeededSweepResult:
    """The same sweep once per seed under ``out/seed-N`` (each continues like a sweep), then aggregated rows."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"sweep directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not any(out.glob("seed-*/sweep.json")):
        # Overwriting replaces each seed's sweep (run_sweep owns that); a folder holding none is not kdcli's.
        raise UsageError(f"{out} exists and is not a kdcli sweep directory; choose another sweep directory")
    sweeps = {}
    for seed in seeds:
        config = recipe.config.model_copy(update={"train": recipe.config.train.model_copy(update={"seed": seed})})
        spec = RunSpec(config, recipe.method, recipe.params)
        sweeps[seed] = run_sweep(runs, spec, seed_dir(out, seed), overwrite=overwrite, **options)
    rows = seed_rows(sweeps)
    atomic_write_bytes(out / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    return SeededSweepResult(out, sweeps, rows)


def seed_rows(sweeps: dict[int, SweepResult]) -> list[dict[str, Any]]:
    """Per teacher checkpoint: the teacher's numbers and each student metric's mean and std over the seeds."""
    rows = []
    first = next(iter(sweeps.values()))
    for index, row in enumerate(first.rows):
        per_seed = {seed: {key: sweep.rows[index][key] for key in STUDENT_METRICS} for seed, sweep in sweeps.items()}
        stats = aggregate(per_seed)
        merged = {key: value for key, value in row.items() if key.startswith("teacher")}
        for key in STUDENT_METRICS:
            merged |= {f"{key}_mean": stats[key]["mean"], f"{key}_std": stats[key]["std"]}
        rows.append(merged | {"seeds": list(sweeps)})
    return rows
