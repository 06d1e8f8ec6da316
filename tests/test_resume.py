"""An interrupted run resumed with --resume ends exactly where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import TINY, run_cli
from kdcli.engine import Trainer

RUN = ["--model", "cifar_resnet8", "--epochs", 3, "--set", "train.deterministic=true", "--set", "data.rotation=10", *TINY]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, epoch_to_stop: int) -> None:
    original = Trainer.train_epoch

    def train_epoch(self: Trainer, epoch: int) -> dict:
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_resume_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = tmp_path / "straight"
    assert run_cli("teach", "--out", straight, *RUN).exit_code == 0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        stopped = run_cli("teach", "--out", resumed, *RUN)
    assert stopped.exit_code == 130, stopped
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 2
    safetensors.torch.load_file(resumed / "last.safetensors")  # the last good checkpoint is intact

    finished = run_cli("teach", "--resume", resumed, "-q")
    assert finished.exit_code == 0, finished
    expected = safetensors.torch.load_file(straight / "last.safetensors")
    actual = safetensors.torch.load_file(resumed / "last.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    straight_lines = (straight / "metrics.jsonl").read_text().splitlines()
    resumed_lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(resumed_lines) == 3
    strip_time = lambda line: {k: v for k, v in __import__("json").loads(line).items() if k not in ("time_s", "samples_per_s")}  # noqa: E731
    assert [strip_time(line) for line in straight_lines] == [strip_time(line) for line in resumed_lines]


def test_distill_resume_after_interrupt(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "student"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--out", out, *RUN).exit_code == 130
    finished = run_cli("distill", "--resume", out, "--json")
    assert finished.exit_code == 0, finished
    summary = finished.json()
    assert summary["epochs"] == 3 and summary["method"] == "kd"
