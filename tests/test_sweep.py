"""kdcli sweep-checkpoints: one student per teacher checkpoint, results and plot, resumable."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

import kdcli.jobs.sweep as sweep_job
from conftest import TINY, run_cli
from kdcli.engine import Trainer
from test_bad_input import assert_clean_error
from test_cli_end_to_end import evaluate

STUDENT = ["--model", "cifar_resnet8", "--epochs", 2, "--set", "train.deterministic=true", *TINY]


def test_sweep_compares_two_teacher_runs(teacher_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_run, other)
    out = tmp_path / "sweep"
    result = run_cli("sweep-checkpoints", teacher_run, other, "--every", 3, *STUDENT, "--epochs", 1, "--out", out, "--json")
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["plot"] is True and summary["sweep_dir"] == str(out)

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["teacher"], row["teacher_epoch"]) for row in rows] == [("teacher", "3"), ("other-teacher", "3")]
    for row in rows:
        assert 0.0 <= float(row["teacher_top1"]) <= 1.0 and 0.0 <= float(row["student_top1"]) <= 1.0
        assert 0.0 <= float(row["teacher_pstar_tv_train"]) <= 1.0 and float(row["teacher_ece"]) >= 0.0
        # Each column holds what it names: independent evaluations of the teacher and student checkpoints agree.
        teacher_eval = evaluate(Path(row["teacher_checkpoint"]))
        student_eval = evaluate(Path(row["student_run"]) / "last.safetensors")
        assert float(row["teacher_top1"]) == pytest.approx(teacher_eval["top1"]) and float(row["teacher_ece"]) == pytest.approx(teacher_eval["ece"])
        assert float(row["student_top1"]) == pytest.approx(student_eval["top1"]) and float(row["student_nll"]) == pytest.approx(student_eval["nll"])
        assert float(row["teacher_nll"]) != pytest.approx(float(row["student_nll"]))  # so a swap of the two would show
    # Same teacher weights, same recipe, deterministic: the two students agree.
    assert rows[0]["teacher_top1"] == rows[1]["teacher_top1"] and rows[0]["student_top1"] == rows[1]["student_top1"]
    entries = json.loads((out / "results.json").read_text())
    assert summary["entries"] == entries
    assert [(entry["teacher"], entry["student_top1"]) for entry in entries] == [(row["teacher"], float(row["student_top1"])) for row in rows]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student_config = json.loads(Path(rows[0]["student_run"], "config.json").read_text())
    assert student_config["method"]["name"] == "kd" and student_config["teacher"] == rows[0]["teacher_checkpoint"]
    assert student_config["data"]["synthetic"]["num_train"] == 480  # the teachers' data, not the default
    assert sorted(path.name for path in Path(rows[0]["student_run"], "checkpoints").iterdir()) == ["epoch_0001.safetensors"]


def test_interrupted_sweep_continues_without_redoing_finished_entries(
    teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    sweep = ["sweep-checkpoints", teacher_run, "--every", 2, *STUDENT, "--out", out]
    original = Trainer.train_epoch
    epochs_trained: list[int] = []

    def train_epoch(self: Trainer, epoch: int) -> dict:
        if len(epochs_trained) == 3:  # entry 1 trained 2 epochs, entry 2 one: stop in its second
            raise KeyboardInterrupt
        epochs_trained.append(epoch)
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", train_epoch)
        stopped = run_cli(*sweep)
    assert_clean_error(stopped, 130, f"--out {out}")
    first_entry = out / "students" / "teacher" / "epoch_0001" / "entry.json"
    finished_at = first_entry.stat().st_mtime_ns

    calls: list[dict] = []
    train = sweep_job.train
    with monkeypatch.context() as patch:
        patch.setattr(sweep_job, "train", lambda spec, out, **kw: calls.append(kw) or train(spec, out, **kw))
        patch.setitem(sys.modules, "matplotlib.figure", None)  # no plot extra: everything else is still written
        finished = run_cli(*sweep)
    assert finished.exit_code == 0, finished
    assert [call["resume"] for call in calls] == [True]  # entry 1 is read back, entry 2 resumes after its epoch 1
    assert first_entry.stat().st_mtime_ns == finished_at
    assert "pip install 'kdcli[plot]'" in finished.stdout and not (out / "sweep.png").exists()
    rows = json.loads((out / "results.json").read_text())
    assert [row["teacher_epoch"] for row in rows] == [1, 3]
    assert len(Path(rows[1]["student_run"], "metrics.jsonl").read_text().splitlines()) == 2

    changed = run_cli(*sweep[:-2], "--lr", "0.01", "--out", out)
    assert_clean_error(changed, 2, "different recipe")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--every", "0"], "--every"),
        (["--method", "standard"], "uses no teacher"),
        (["--set", "data.synthetic.num_train=960"], "data its teachers were trained on"),
        (["--set", "method.temperature=-1"], "method.temperature"),
    ],
)
def test_bad_sweep_requests_fail_before_training(teacher_run: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    result = run_cli("sweep-checkpoints", teacher_run, *extra, "--out", tmp_path / "sweep", "-q")
    assert_clean_error(result, 2, fragment)
    assert not (tmp_path / "sweep").exists()


def test_sweep_needs_teacher_checkpoints_and_distinct_names(teacher_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("sweep-checkpoints", empty, "--out", tmp_path / "s"), 2, "no saved teacher checkpoints")
    twin = tmp_path / "twin" / teacher_run.name
    shutil.copytree(teacher_run, twin)
    assert_clean_error(run_cli("sweep-checkpoints", teacher_run, twin, "--out", tmp_path / "s"), 2, "names must differ")
