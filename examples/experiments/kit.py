"""What the experiment scripts share: runs that are reused when finished, mean ± std, results files, bar charts.

Every run goes through ``run_training``, the same job the CLI runs. A run whose
directory holds a ``summary.json`` and the same resolved config is reused, so a
script can be rerun with more variants or seeds and trains only what is new.
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcli.config import build_config, load_resolved_config
from kdcli.jobs.build import resolve_run
from kdcli.jobs.train import run_training


def run(out: Path, tree: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the run that ``tree`` (a config tree) and ``overrides`` (``KEY=VALUE``) describe into ``out``; its summary."""
    config = resolve_run(build_config(defaults=dict(tree), overrides=list(overrides))).config
    summary_file = out / "summary.json"
    if summary_file.is_file() and (out / "config.json").is_file() and load_resolved_config(out / "config.json") == config:
        return json.loads(summary_file.read_text())
    started = time.perf_counter()
    run_training(config, out, overwrite=True, show_progress=False)
    summary = json.loads(summary_file.read_text())
    print(f"  {out}: test top-1 {summary['test']['top1']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return summary


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, payload: Mapping[str, Any], table: str) -> None:
    """``results.json`` and ``results.md`` under ``out``; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n")
    print("\n" + table, flush=True)


def bar_chart(path: Path, groups: Mapping[str, Mapping[str, Sequence[float]]], *, ylabel: str, title: str) -> None:
    """Grouped bars of mean with a ±std whisker: ``groups[group][bar] = values over seeds``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = list(dict.fromkeys(bar for values in groups.values() for bar in values))
    width = 0.8 / len(bars)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.55 * len(groups) * len(bars) + 2.5), 4.2))
    for offset, bar in enumerate(bars):
        positions, means, spreads = [], [], []
        for position, values in enumerate(groups.values()):
            if bar in values:
                seeds = list(values[bar])
                positions.append(position + (offset - (len(bars) - 1) / 2) * width)
                means.append(statistics.mean(seeds))
                spreads.append(statistics.stdev(seeds) if len(seeds) > 1 else 0.0)
        axes.bar(positions, means, width, yerr=spreads, capsize=3, label=bar)
    axes.set_xticks(range(len(groups)), list(groups))
    spans = [(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for values in groups.values() for v in map(list, values.values())]
    low, high = min(mean - std for mean, std in spans), max(mean + std for mean, std in spans)
    axes.set_ylim(max(0.0, low - 0.1 * (high - low + 0.05)), high + 0.15 * (high - low + 0.05))
    axes.set_ylabel(ylabel)
    axes.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    axes.legend(fontsize=7, ncols=min(3, len(bars)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}", flush=True)
