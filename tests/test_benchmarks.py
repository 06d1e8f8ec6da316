"""Every benchmark and the GPU check's CPU dry run, at a tiny size: each row must produce a number.

These runs say nothing about speed (``make bench`` and ``make gpu-check`` measure that); they exist so
that no benchmark can break unseen, as the engine benchmark and the device check once did when the
teacher lineage began reading the teacher's file.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import benchmarks

ROOT = Path(__file__).resolve().parents[1]
# "NAME: BASELINE X unit, CANDIDATE Y unit, ratio Zx": the line every comparison prints (benchmarks.common.report).
RATIO = re.compile(r"ratio (\S+)x")


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter: the smoke sizes are read when the benchmark modules are imported."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def bench_modules() -> list[str]:
    return sorted(path.stem for path in Path(benchmarks.__file__).parent.glob("bench_*.py"))


def test_every_benchmark_runs_at_smoke_size_and_reports_finite_ratios() -> None:
    completed = run_module("benchmarks", "--smoke")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "FAILED" not in output and "skipped" not in output, output[-3000:]
    ratios = [float(value) for value in RATIO.findall(completed.stdout)]
    # Each benchmark module prints at least one comparison; the top-k cache table prints its own rows.
    assert len(ratios) >= len(bench_modules()) - 1, completed.stdout
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), completed.stdout
    assert re.search(r"\| top-5 \| 44 \| \S+ / \S+ \|", completed.stdout) and "| fp16 | 2004 |" in completed.stdout, completed.stdout


def test_gpu_check_dry_run_gives_every_row_a_number(tmp_path: Path) -> None:
    """``make gpu-check-cpu`` scaled down further: two precisions, one batch size, every method eager."""
    completed = run_module(
        "benchmarks.gpu_check", "--device", "cpu", "--smoke", "--variants", "fp32,bf16", "--batch-sizes", "16",
        "--method-variant", "fp32", "--out", str(tmp_path),
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_tests"]["returncode"] == 0 and report["cuda_tests"].get("skipped", 0) > 0  # no GPU here
    loops = {row["loop"]: row for row in report["results"]}
    assert set(loops) == {"repdistiller-style", "bare loop (eager fp32)", "kdcli fp32", "kdcli bf16"}
    assert all(row["skipped"] is None and row["images_per_s"] > 0 and row["ratio_to_repdistiller"] > 0 for row in loops.values())
    assert loops["kdcli fp32"]["ratio_to_bare_loop"] > 0
    methods = {row["method"]: row for row in report["methods"]}
    assert {"kd", "standard", "soteacher", "adaptive-fusion", "feature-mimic", "tfkd-self", "tfkd-virtual"} <= set(methods)
    for row in methods.values():
        assert row["skipped"] is None and row["samples_per_s"] > 0 and row["step_time_vs_baseline"] > 0, row
    assert methods["kd"]["step_time_vs_baseline"] == 1.0
    assert (tmp_path / "gpu_check.log").read_text().count("| kd | distill |") == 1
    profile = (tmp_path / "profile.txt").read_text()
    assert report["profile"] in profile and "Self CPU" in profile
