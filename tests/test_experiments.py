"""The ``make experiment-*`` scripts, run for real at a tiny scale: they train, tabulate, plot, and reuse finished runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TRAINED_LINE = re.compile(r"^  \S.*: test top-1 [0-9.]+ \(\d+ s\)$", re.MULTILINE)  # kit.run's line for a run it trained
EXPERIMENTS = Path(__file__).resolve().parents[1] / "examples" / "experiments"
TINY: dict[str, list[str]] = {
    "adaptive_fusion.py": ["--num-train", "300", "--teacher-epochs", "1", "--student-epochs", "1", "--seeds", "0", "1",
                           "--arms", "fixed 0.9", "learned, clean meta set"],
    "feature_mimic.py": ["--num-train", "300", "--teacher-num-train", "400", "--teacher-epochs", "2", "--student-epochs", "1",
                         "--seeds", "0", "--sigmas", "0.3", "--arms", "baseline", "mimic, weak teacher"],
    "soteacher_vs_standard.py": ["--num-train", "300", "--teacher-epochs", "1", "--student-epochs", "1", "--seeds", "0",
                                 "--only", "standard", "soteacher λ_LR 1e-3"],
    "tfkd.py": ["--num-train", "300", "--epochs", "1", "--seeds", "0"],
}


def run_script(script: str, out: Path) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--out", str(out), *TINY[script]],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.parametrize("script", sorted(TINY))
def test_experiment_script_trains_tabulates_and_plots(script: str, tmp_path: Path) -> None:
    first = run_script(script, tmp_path)
    results = next(tmp_path.rglob("results.json"))
    table = (results.parent / "results.md").read_text()
    assert "± " in table and table.strip() in first
    assert json.loads(results.read_text())
    plot = next(tmp_path.rglob("*.png"))
    assert plot.read_bytes().startswith(b"\x89PNG")
    again = run_script(script, tmp_path)  # every run is finished: reused, nothing trains again
    assert TRAINED_LINE.search(first) and not TRAINED_LINE.search(again)
    assert (results.parent / "results.md").read_text() == table
