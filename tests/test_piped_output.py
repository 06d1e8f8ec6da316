"""Output read through a pipe or a log file: tables uncut, progress inside an epoch, integer epoch ticks (issue 27)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from conftest import run_cli
from kdcli import progress
from kdcli.progress import EpochProgress

# 432 training samples (480 less the val split) in batches of 16: 27 steps, reported every 10, so two reports before the last step.
PIPED_RUN = ["--set", "data.synthetic.num_train=480", "--set", "data.synthetic.num_test=64", "--batch-size", "16", "--model", "cifar_resnet8"]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A one-epoch run, not quiet, with stderr captured (not a terminal) and a progress line allowed at every report."""
    out = tmp_path_factory.mktemp("piped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress, "PIPED_PROGRESS_SECONDS", 0.0)
        result = run_cli("teach", *PIPED_RUN, "--epochs", 1, "--out", out)
    assert result.exit_code == 0, result
    return out, result.stderr


def test_a_piped_run_reports_progress_inside_the_epoch(piped_run: tuple[Path, str]) -> None:
    _, stderr = piped_run
    lines = [line for line in stderr.splitlines() if " step " in line]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/1", "step 10/27"], ["epoch 1/1", "step 20/27"]]
    assert all("loss " in line and "acc " in line for line in lines)
    assert "\x1b[" not in stderr and "━" not in stderr  # no bar, no terminal codes in a log


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    yield fake


def test_piped_progress_lines_come_at_most_every_interval(clock: FakeClock) -> None:
    log = io.StringIO()
    bar = EpochProgress(Console(file=log, force_terminal=False), epoch=2, epochs=5, steps=1000, done=0)
    interval = progress.PIPED_PROGRESS_SECONDS
    with bar:
        for step, elapsed in ((10, 1.0), (20, interval - 1), (30, interval + 1), (40, interval + 2), (50, 2 * interval + 2), (1000, 9 * interval)):
            clock.now = 100.0 + elapsed
            bar.advance(step, 0.5, 0.25)
    steps = [line.split("  ")[1] for line in log.getvalue().splitlines()]
    assert steps == ["step 30/1000", "step 50/1000"]  # never twice within the interval; the last step is the epoch line's


def test_no_progress_lines_on_a_quiet_console(clock: FakeClock) -> None:
    log = io.StringIO()
    with EpochProgress(Console(file=log, force_terminal=False, quiet=True), epoch=1, epochs=1, steps=100, done=0) as bar:
        clock.now += 10 * progress.PIPED_PROGRESS_SECONDS
        bar.advance(50, 0.5, 0.25)
    assert log.getvalue() == ""


def test_tables_in_a_pipe_are_not_cut_at_80_columns() -> None:
    methods = run_cli("methods", "list", "--json").json()
    table = run_cli("methods", "list")
    assert table.exit_code == 0, table
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) > 80
    for method in methods:  # every summary whole, on its row's one line
        assert any(f"│ {method['name']} " in line and method["summary"] in line for line in lines), method["name"]


def test_one_epoch_plots_integer_epoch_ticks(piped_run: tuple[Path, str]) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from kdcli.jobs.plot import _draw, panels
    from kdcli.results import read_results

    run, _ = piped_run
    sets = [read_results(run)]
    for panel in panels(sets):
        axes = Figure().subplots()
        _draw(axes, panel, sets)
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert ticks == [1.0], (panel.title, ticks)
