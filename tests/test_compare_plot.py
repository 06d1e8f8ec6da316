"""kdcli compare and kdcli plot read run directories and seed groups back."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from kdcli.results import best_epoch


@pytest.fixture(scope="module")
def two_methods(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    kd = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 2, "--seeds", "0,1", "--out", root / "kd", *TINY)
    assert kd.exit_code == 0, kd
    fusion = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--method", "adaptive-fusion", "--epochs", 2, "--out", root / "af", *TINY)
    assert fusion.exit_code == 0, fusion
    return root / "kd", root / "af"


def test_compare_table_json_and_csv(two_methods: tuple[Path, Path]) -> None:
    kd, fusion = two_methods
    rows = run_cli("compare", kd, fusion, "--json").json()
    assert [row["method"] for row in rows] == ["kd", "adaptive-fusion"]
    assert rows[0]["seeds"] == [0, 1] and rows[1]["seeds"] is None
    per_seed = [json.loads((kd / f"seed-{seed}" / "summary.json").read_text())["test"]["top1"] for seed in (0, 1)]
    assert rows[0]["metrics"]["test/top1"]["mean"] == pytest.approx(sum(per_seed) / 2)
    history = [json.loads(line) for line in (fusion / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda record: record["val_top1"])
    assert rows[1]["metrics"]["best/val_top1"]["mean"] == pytest.approx(best["val_top1"])
    assert rows[1]["metrics"]["best/epoch"]["mean"] == best["epoch"]
    table = run_cli("compare", kd, fusion)
    assert table.exit_code == 0 and "adaptive-fusion" in table.stdout and "±" in table.stdout
    lines = list(csv.DictReader(io.StringIO(run_cli("compare", kd, fusion, "--csv").stdout)))
    assert [line["method"] for line in lines] == ["kd", "adaptive-fusion"]
    assert float(lines[1]["test/top1"]) == pytest.approx(rows[1]["metrics"]["test/top1"]["mean"])


def test_plot_draws_every_quantity(two_methods: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    output = tmp_path / "curves.png"
    result = run_cli("plot", *two_methods, "-o", output)
    assert result.exit_code == 0, result
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for title in ("loss: kd", "top-1", "learning rate", "method: alpha_mean"):
        assert title in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "missing-dir"], "is not a directory"),
        (["plot", "missing-dir", "-o", "x.png"], "is not a directory"),
        (["compare", ".", "--json", "--csv"], "--json or --csv"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.exit_code == 2 and result.stderr.startswith("kdcli: error:") and message in result.stderr


def test_a_directory_that_is_no_run(tmp_path: Path) -> None:
    result = run_cli("compare", tmp_path)
    assert result.exit_code == 2 and "not a kdcli run directory" in result.stderr
    result = run_cli("plot", tmp_path, "-o", tmp_path / "x.jpg")
    assert result.exit_code == 2 and ".png" in result.stderr


def test_best_epoch_is_the_first_with_the_highest_val_top1() -> None:
    """The engine keeps the first of equal epochs (strictly better only), and compare reads history the same way."""
    history = [{"epoch": epoch, "val_top1": top1} for epoch, top1 in enumerate((0.3, 0.5, 0.5, 0.4), start=1)]
    assert best_epoch(history) == {"epoch": 2, "val_top1": 0.5}
    assert best_epoch([{"epoch": 1, "train": {}}]) is None  # no validation split
