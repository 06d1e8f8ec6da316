"""--seeds: one run per seed, finished seeds read back, mean ± std of every final metric."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def seed_group(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seeds") / "kd"
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 1, "--seeds", "0-1,3", "--out", out, "--json", *TINY)
    assert result.exit_code == 0, result
    return out, result.json()


def test_one_run_per_seed_and_the_aggregate(seed_group: tuple[Path, dict]) -> None:
    out, report = seed_group
    assert report["seeds"] == [0, 1, 3]
    for seed in (0, 1, 3):
        assert (out / f"seed-{seed}" / "summary.json").is_file()
        assert report["runs"][str(seed)]["test"]["top1"] == report["per_seed"]["test/top1"][str(seed)]
    values = list(report["per_seed"]["test/top1"].values())
    assert report["aggregate"]["test/top1"]["mean"] == pytest.approx(statistics.fmean(values))
    assert report["aggregate"]["test/top1"]["std"] == pytest.approx(statistics.stdev(values))
    assert {"test/nll", "val_top1", "loss/kd"} <= set(report["aggregate"])


def test_each_run_trains_with_its_own_seed(seed_group: tuple[Path, dict]) -> None:
    out, _ = seed_group
    weights = {}
    for seed in (0, 1, 3):
        assert json.loads((out / f"seed-{seed}" / "config.json").read_text())["train"]["seed"] == seed
        weights[seed] = safetensors.torch.load_file(out / f"seed-{seed}" / "last.safetensors")
    # Training is deterministic on CPU, so equal weights would mean one seed trained every run.
    for one, other in ((0, 1), (0, 3), (1, 3)):
        assert any(not torch.equal(weights[one][name], weights[other][name]) for name in weights[one])


def test_rerun_reads_finished_seeds_back_and_adds_new_ones(seed_group: tuple[Path, dict], teacher_run: Path) -> None:
    out, report = seed_group
    stamp = (out / "seed-0" / "last.safetensors").stat().st_mtime_ns
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 1, "--seeds", "0,1,3,4", "--out", out, *TINY[:-1])
    assert result.exit_code == 0, result
    assert (out / "seed-0" / "last.safetensors").stat().st_mtime_ns == stamp
    assert "seed 0: test top-1" in result.stderr and "read back" in result.stderr
    assert "mean ± std" in result.stdout and "seed 4" in result.stdout
    resumed = run_cli("distill", "--resume", out, "--json", "-q")
    assert resumed.exit_code == 0, resumed
    assert resumed.json()["per_seed"]["test/top1"]["0"] == report["per_seed"]["test/top1"]["0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "2-1"], "is empty"),
        (["--seeds", "a,b"], "--seeds takes seeds"),
        (["--seeds", "1", "--seed", "2"], "--seed or --seeds"),
    ],
)
def test_bad_seeds_are_one_line(teacher_run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "x", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("kdcli: error:") and message in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_different_recipe_is_refused(seed_group: tuple[Path, dict], teacher_run: Path) -> None:
    out, _ = seed_group
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 2, "--seeds", "0", "--out", out, *TINY)
    assert result.exit_code == 2 and "different config" in result.stderr


def test_sweep_checkpoints_with_seeds(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run_cli("sweep-checkpoints", teacher_run, "--epochs", 1, "--every", 3, "--seeds", "0,1", "--out", out, "--json", *TINY)
    assert result.exit_code == 0, result
    report = result.json()
    assert report["seeds"] == [0, 1] and (out / "seed-1" / "results.csv").is_file()
    row = report["entries"][0]
    students = [sweep["entries"][0]["student_top1"] for sweep in report["per_seed"].values()]
    assert row["student_top1_mean"] == pytest.approx(statistics.fmean(students))
