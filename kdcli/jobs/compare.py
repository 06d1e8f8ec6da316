"""``compare``: the final and best metrics of many runs or seed groups, side by side (reads files only)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from kdcli.errors import UsageError
from kdcli.results import ResultSet, aggregate, best_epoch, read_results

# The metric columns of the table, in order; the JSON and CSV forms carry every metric.
TABLE_METRICS = ("test/top1", "test/nll", "test/ece", "val_top1", "best/val_top1", "best/epoch")


def run_metrics(result: ResultSet) -> dict[int | None, dict[str, float]]:
    """Each run's final metrics plus ``best/val_top1`` and ``best/epoch`` (the epoch with the best val top-1)."""
    metrics = {}
    for seed, run in result.runs.items():
        values = dict(run.final)
        best = best_epoch(run.history)
        if best is not None:
            values |= {"best/val_top1": float(best["val_top1"]), "best/epoch": float(best["epoch"])}
        metrics[seed] = values
    return metrics


def compare_row(result: ResultSet) -> dict[str, Any]:
    config = result.first.config
    unfinished = [str(run.path) for run in result.runs.values() if run.summary is None]
    return {
        "run": str(result.path),
        "label": result.label,
        "job": config.get("job"),
        "method": (config.get("method") or {}).get("name"),
        "model": (config.get("model") or {}).get("name"),
        "seeds": sorted(seed for seed in result.runs if seed is not None) if result.is_group else None,
        "epochs": max(len(run.history) for run in result.runs.values()),
        "unfinished": unfinished,
        "metrics": aggregate(run_metrics(result)),
    }


def compare_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per run directory or seed group; all of them are read before anything is shown."""
    if not paths:
        raise UsageError("give at least one run directory")
    return [compare_row(read_results(path)) for path in paths]


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """One line per row: identity columns, then every metric's mean and std (empty where a run lacks it)."""
    names = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    header = ["run", "job", "method", "model", "seeds", "epochs"] + [column for name in names for column in (name, f"{name}_std")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        seeds = " ".join(map(str, row["seeds"])) if row["seeds"] is not None else ""
        values = []
        for name in names:
            stats = row["metrics"].get(name)
            values += ["", ""] if stats is None else [stats["mean"], stats["std"]]
        writer.writerow([row["run"], row["job"], row["method"], row["model"], seeds, row["epochs"], *values])
    return buffer.getvalue()
