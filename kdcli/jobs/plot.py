"""``plot``: learning curves of several runs or seed groups in one figure (matplotlib, the ``plot`` extra).

One panel per quantity: each loss term, train/val top-1, the learning rate, and
every per-epoch number a method logs (e.g. adaptive-fusion's ratio α).  One
colour per run; a seed group is drawn as its mean over seeds with a band of
± one standard deviation.
"""

from __future__ import annotations

import io
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.files import atomic_write_bytes, check_target
from kdcli.errors import KdcliError, UsageError
from kdcli.results import ResultSet, read_results

PANEL_COLUMNS = 3
MAX_PANELS = 30  # a figure beyond this is unreadable and slow to draw; the rest are named in a note
PLOT_SOFTWARE = "kdcli plot"  # the PNG's Software tag: plot replaces only a file it drew


@dataclass(frozen=True)
class Panel:
    """One axes: its title and the epoch-record keys drawn in it, each with a line style."""

    title: str
    series: tuple[tuple[str, str], ...]  # (flattened record key, line style)


def panels(sets: list[ResultSet]) -> list[Panel]:
    """Loss terms, top-1, learning rate, then method numbers: whatever any of the runs recorded."""
    keys = list(dict.fromkeys(key for result in sets for run in result.runs.values() for _, values in run.flat_history for key in values))
    chosen = [Panel(f"loss: {key.split('/', 1)[1]}", ((key, "-"),)) for key in keys if key.startswith("loss/")]
    top1 = tuple((key, style) for key, style in (("train_top1", "--"), ("val_top1", "-")) if key in keys)
    if top1:
        chosen.append(Panel("top-1 (train dashed, val solid)" if len(top1) == 2 else "top-1", top1))
    if "lr" in keys:
        chosen.append(Panel("learning rate", (("lr", "-"),)))
    chosen += [Panel(f"method: {key.split('/', 1)[1]}", ((key, "-"),)) for key in keys if key.startswith("method/")]
    return chosen


def curve(result: ResultSet, key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean over the runs that have the value, and its standard deviation (0 for one run)."""
    by_epoch: dict[int, list[float]] = {}
    for run in result.runs.values():
        for epoch, values in run.flat_history:
            value = values.get(key)
            if value is not None and math.isfinite(value):
                by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    means = [statistics.fmean(by_epoch[epoch]) for epoch in epochs]
    stds = [statistics.stdev(by_epoch[epoch]) if len(by_epoch[epoch]) > 1 else 0.0 for epoch in epochs]
    return epochs, means, stds


def _label(result: ResultSet) -> str:
    method = (result.first.config.get("method") or {}).get("name", "?")
    seeds = f", {len(result.runs)} seeds" if result.is_group else ""
    return f"{result.label} ({method}{seeds})"


def _draw(axes: Any, panel: Panel, sets: list[ResultSet]) -> None:
    from matplotlib.ticker import MaxNLocator

    for index, result in enumerate(sets):
        colour = f"C{index % 10}"
        for key, style in panel.series:
            epochs, means, stds = curve(result, key)
            if not epochs:
                continue
            axes.plot(epochs, means, linestyle=style, marker="o", markersize=3, color=colour)
            if result.is_group:
                axes.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], color=colour, alpha=0.15)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: tick 1, not 0.945 ... 1.065
    axes.set_title(panel.title, fontsize="medium")
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)


@dataclass(frozen=True)
class PlotResult:
    titles: list[str]  # the panels drawn
    left_out: list[str]  # panels beyond MAX_PANELS, not drawn


def check_output(output: Path, reads: list[Path]) -> None:
    """A .png that is no link, no input, and either new or a plot kdcli drew before."""
    if output.suffix.lower() != ".png":
        raise UsageError(f"the plot is written as PNG: name a .png file (got {output})")
    check_target(output, reads=reads)
    if output.exists() and not _drawn_by_kdcli(output):
        raise UsageError(f"refusing to overwrite {output}: kdcli did not draw it (its PNG carries no {PLOT_SOFTWARE!r} tag); name another file")


def _drawn_by_kdcli(path: Path) -> bool:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge PNG: not ours, and no raw warning
            with Image.open(path, formats=["PNG"]) as image:  # reads the chunks before the pixels only
                return image.info.get("Software") == PLOT_SOFTWARE
    except Exception:  # noqa: BLE001 -- anything Pillow cannot read is not a plot kdcli drew
        return False


def plot_runs(paths: list[Path], output: Path) -> PlotResult:
    """Draw the curves of ``paths`` into the PNG ``output``."""
    if not paths:
        raise UsageError("give at least one run directory")
    check_output(output, [path / name for path in paths for name in ("metrics.jsonl", "summary.json", "config.json")])
    sets = [read_results(path) for path in paths]
    chosen = panels(sets)
    if not chosen:
        raise UsageError("the runs have no finished epochs to plot yet")
    try:
        from matplotlib.figure import Figure  # optional: the ``plot`` extra
        from matplotlib.lines import Line2D
    except ImportError:
        raise KdcliError("plot needs matplotlib: pip install 'kdcli[plot]'") from None
    drawn = chosen[:MAX_PANELS]
    columns = min(PANEL_COLUMNS, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows + 0.6), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, panel in zip(grid.flat, drawn):
        _draw(axes, panel, sets)
    for axes in list(grid.flat)[len(drawn):]:
        axes.set_visible(False)
    handles = [Line2D([], [], color=f"C{index % 10}", marker="o", markersize=3, label=_label(result)) for index, result in enumerate(sets)]
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), fontsize="small")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110, metadata={"Software": PLOT_SOFTWARE})
    atomic_write_bytes(output, image.getvalue())
    return PlotResult([panel.title for panel in drawn], [panel.title for panel in chosen[MAX_PANELS:]])
