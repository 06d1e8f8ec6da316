"""Every installed method on the device: its step time against its baseline, and what torch.compile makes of it.

Part of ``make gpu-check``.  Each method trains three short epochs of a real ``Trainer`` in one variant
(default bf16 + channels_last + compile), whose training split ends in a smaller batch, as real epochs do.
Epoch 1 warms up (and compiles); epochs 2 and 3 are timed.  Dynamo's counters give the graphs compiled in
epoch 1, the graphs compiled after it (recompiles: each one is time lost in every epoch of a real run)
and the graph breaks.  A distill method is compared with ``kd``, a teach method with ``standard``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from benchmarks.bench_methods import BASELINES, job_of
from benchmarks.common import markdown_table
from benchmarks.harness import Workload, build_trainer
from kdcli.config import RunConfig
from kdcli.registry import method_plugins

TIMED_EPOCHS = (2, 3)


@dataclass
class MethodRow:
    """One method in one variant."""

    method: str
    job: str
    baseline: str
    samples_per_s: float | None = None
    step_time_vs_baseline: float | None = None  # > 1: slower than the baseline's step
    graphs_first_epoch: int | None = None
    graphs_after_first_epoch: int | None = None
    graph_breaks: int | None = None
    break_reasons: list[str] = field(default_factory=list)
    skipped: str | None = None


def method_config(workload: Workload, method: str, job: str, train: dict[str, Any]) -> RunConfig:
    tree = workload.config(method, job).model_dump(mode="json")
    tree["train"].update(train, epochs=max(TIMED_EPOCHS))
    return RunConfig.model_validate(tree)


def compile_counts() -> tuple[int, int]:
    """Graphs compiled and graph breaks so far (since the last ``torch._dynamo.reset``)."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def measure_method(method: str, job: str, workload: Workload, train: dict[str, Any], scratch: Path) -> MethodRow:
    torch._dynamo.reset()
    counters.clear()
    row = MethodRow(method, job, BASELINES[job])
    trainer = build_trainer(method_config(workload, method, job, train), workload, scratch / method)
    trainer.train_epoch(1)
    row.graphs_first_epoch, _ = compile_counts()
    speeds = [trainer.train_epoch(epoch)["samples_per_s"] for epoch in TIMED_EPOCHS]
    graphs, row.graph_breaks = compile_counts()
    row.graphs_after_first_epoch = graphs - row.graphs_first_epoch
    row.break_reasons = sorted(counters["graph_break"], key=counters["graph_break"].get, reverse=True)[:3]
    row.samples_per_s = round(max(speeds), 1)
    return row


def measure_methods(workload: Workload, train: dict[str, Any], log: Callable[[str], None], deadline: float) -> list[MethodRow]:
    """Every loadable method (baselines first); one that fails is recorded with its reason and the others go on.

    None starts after ``deadline`` (``time.monotonic()``): those are recorded as skipped."""
    plugins = [plugin for plugin in method_plugins() if plugin.error is None]
    plugins.sort(key=lambda plugin: plugin.name not in BASELINES.values())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for plugin in plugins:
            job = job_of(plugin.loaded)
            if time.monotonic() > deadline:
                rows.append(MethodRow(plugin.name, job, BASELINES[job], skipped="time budget spent"))
                continue
            try:
                row = measure_method(plugin.name, job, workload, train, Path(scratch))
            except Exception as exc:  # noqa: BLE001 - one failing method must not cost the others' numbers
                row = MethodRow(plugin.name, job, BASELINES[job], skipped=f"failed: {type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            log(f"  {describe(row)}")
    return with_baseline_ratios(rows)


def with_baseline_ratios(rows: list[MethodRow]) -> list[MethodRow]:
    speeds = {row.method: row.samples_per_s for row in rows}
    for row in rows:
        baseline = speeds.get(row.baseline)
        if row.samples_per_s and baseline:
            row.step_time_vs_baseline = round(baseline / row.samples_per_s, 3)
    return rows


def describe(row: MethodRow) -> str:
    if row.skipped:
        return f"{row.method:<16} skipped ({row.skipped})"
    return (
        f"{row.method:<16} {row.samples_per_s:,.0f} samples/s, graphs {row.graphs_first_epoch} in epoch 1 "
        f"+ {row.graphs_after_first_epoch} after, {row.graph_breaks} graph breaks"
    )


def table(rows: list[MethodRow]) -> str:
    header = ["method", "job", "samples/s", "step time vs baseline", "graphs in epoch 1", "recompiles after epoch 1", "graph breaks", "top break reasons"]
    return markdown_table(header, [row_cells(row) for row in rows])


def row_cells(row: MethodRow) -> list[object]:
    if row.skipped:
        return [row.method, row.job, f"skipped: {row.skipped}", "", "", "", "", ""]
    ratio = f"{row.step_time_vs_baseline}x {row.baseline}" if row.step_time_vs_baseline else None
    reasons = "; ".join(reason.replace("|", "/")[:80] for reason in row.break_reasons) or None
    return [row.method, row.job, f"{row.samples_per_s:,.1f}", ratio, row.graphs_first_epoch, row.graphs_after_first_epoch, row.graph_breaks, reasons]
