"""Run a paper's whole CIFAR-100 table (teachers, students, seeds) and aggregate it next to the paper's numbers.

    python examples/tables/run_table.py examples/tables/dkd.toml --data-root data --download
    python examples/tables/run_table.py examples/tables/crd.toml --rows "resnet32x4 -> resnet8x4" --seeds 0 1 2
    python examples/tables/run_table.py examples/tables/tfkd.toml --dry-run      # list the runs, train nothing

A table file (``examples/tables/*.toml``) lists rows; each row names its teachers (trained
once, with ``--teacher-seed``) and its students (trained once per seed; a student with a
``teacher`` distills from that teacher's last checkpoint; ``job = "distill"`` marks a
teacher-free distill method), each by a kdcli config under
``examples/``, plus the paper's numbers. Every run has its own directory,
``OUT/<config>/seed<N>`` (``OUT/<config>/from-<teacher config>-seed<N>/seed<M>`` for a
distilled student), so runs shared by rows or tables (a teacher of both the CRD and the
DKD table) train once. Rerunning the same command continues interrupted runs and reads
finished ones back. The aggregate (mean ± std of the last epoch's test top-1, %) is
printed and written to ``OUT/<table>.md`` and ``OUT/<table>.json``.

A GPU is assumed (the recipes are 200-240 epochs of CIFAR-100); ``--set`` overrides apply to
every new run, e.g. ``--set data.root=/data``; ``--set train.epochs=1`` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.config import build_config
from kdcli.errors import KdcliError
from kdcli.files import atomic_write_bytes, check_target
from kdcli.jobs.train import run_training

EXAMPLES = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One training run: its job, config (relative to ``examples/``), seed, and the teacher run it distills from."""

    job: str
    config: str
    seed: int
    teacher: Run | None = None

    def directory(self, out: Path) -> Path:
        base = out / Path(self.config).with_suffix("")
        if self.teacher is not None:
            base = base / f"from-{Path(self.teacher.config).with_suffix('').as_posix().replace('/', '_')}-seed{self.teacher.seed}"
        return base / f"seed{self.seed}"


@dataclass
class Row:
    """A row of the table: teacher runs by label, student runs by label (one per seed), published numbers."""

    name: str
    teachers: dict[str, Run]
    students: dict[str, list[Run]]
    published: dict[str, float] = field(default_factory=dict)


def read_table(path: Path, seeds: list[int], teacher_seed: int) -> tuple[str, list[Row]]:
    """The table's title and rows, with every run resolved to its config, seed and teacher."""
    spec = tomllib.loads(path.read_text())
    rows = []
    for entry in spec["rows"]:
        teachers = {label: Run("teach", config, teacher_seed) for label, config in entry.get("teachers", {}).items()}
        students = {}
        for label, student in entry["students"].items():
            teacher = teachers[student["teacher"]] if "teacher" in student else None
            # A student without a teacher network is a teach job, unless its method distills without one (tfkd-virtual).
            job = student.get("job", "teach" if teacher is None else "distill")
            students[label] = [Run(job, student["config"], seed, teacher) for seed in seeds]
        rows.append(Row(entry["name"], teachers, students, entry.get("published", {})))
    return spec["title"], rows


def train(run: Run, out: Path, overrides: list[str]) -> float:
    """Test top-1 of the run's last epoch: trains it, continues it, or reads it back when finished."""
    directory = run.directory(out)
    if (directory / "resume.safetensors").is_file():
        summary = run_training(build_config(flags={"job": run.job}), directory, resume=True)  # a finished run returns at once
    else:
        flags: dict[str, Any] = {"job": run.job, "train": {"seed": run.seed}}
        if run.teacher is not None:
            flags["teacher"] = str(run.teacher.directory(out) / "last.safetensors")
        config = build_config(file=EXAMPLES / run.config, flags=flags, overrides=overrides)
        summary = run_training(config, directory, overwrite=True)
    return 100.0 * summary.test["top1"]


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def run_row(row: Row, out: Path, overrides: list[str]) -> dict[str, list[float]]:
    """Top-1 (%) of every run of the row by label; teachers first, as students need them."""
    results = {label: [train(run, out, overrides)] for label, run in row.teachers.items()}
    for label, runs in row.students.items():
        results[label] = [train(run, out, overrides) for run in runs]
    return results


def markdown(title: str, rows: list[Row], results: dict[str, dict[str, list[float]]]) -> str:
    """One line per row and label: kdcli's mean ± std over seeds, and the paper's number."""
    lines = [f"### {title}", "", "| row | run | kdcli top-1 (%) | seeds | paper |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        labels = list(row.teachers) + list(row.students)
        labels += [label for label in row.published if label not in labels]  # methods kdcli does not ship
        for label in labels:
            values = results.get(row.name, {}).get(label)
            measured = mean_std(values) if values else "not run"
            paper = row.published.get(label)
            lines.append(f"| {row.name} | {label} | {measured} | {len(values or [])} | {'' if paper is None else f'{paper:.2f}'} |")
    return "\n".join(lines) + "\n"


def all_runs(rows: list[Row]) -> list[Run]:
    """Every distinct run of the rows, teachers before their students."""
    runs = [run for row in rows for run in [*row.teachers.values(), *(run for runs in row.students.values() for run in runs)]]
    return list(dict.fromkeys(runs))


def dry_run(rows: list[Row], out: Path) -> None:
    for run in all_runs(rows):
        teacher = f" --teacher {run.teacher.directory(out) / 'last.safetensors'}" if run.teacher else ""
        print(f"kdcli {run.job} --config examples/{run.config} --seed {run.seed}{teacher} --out {run.directory(out)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="A table file, e.g. examples/tables/dkd.toml.")
    parser.add_argument("--rows", nargs="+", help="Only these rows (by name); default: all.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student seeds.")
    parser.add_argument("--teacher-seed", type=int, default=0, help="Seed of every teacher run.")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--data-root", help="Where CIFAR-100 is (or goes, with --download).")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override in every new run.")
    parser.add_argument("--dry-run", action="store_true", help="Print the runs, train nothing.")
    args = parser.parse_args()

    title, rows = read_table(args.table, args.seeds, args.teacher_seed)
    if args.rows:
        unknown = set(args.rows) - {row.name for row in rows}
        if unknown:
            parser.error(f"no row {sorted(unknown)} in {args.table}; rows: {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in args.rows]
    if args.dry_run:
        dry_run(rows, args.out)
        return
    report_md, report_json = args.out / f"{args.table.stem}.md", args.out / f"{args.table.stem}.json"
    try:
        for path in (report_md, report_json):  # kdcli's rule for every file it writes, checked before the first run trains
            check_target(path)
    except KdcliError as exc:
        parser.error(str(exc))
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.download:
        overrides.append("data.download=true")
    results = {row.name: run_row(row, args.out, overrides) for row in rows}
    report = markdown(title, rows, results)
    print(report)
    atomic_write_bytes(report_md, report.encode())
    atomic_write_bytes(report_json, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
