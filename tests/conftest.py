"""Shared fixtures: tiny synthetic runs trained once per session through the real CLI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from kdcli.cli import app

# A data set and model small enough that an epoch takes well under a second on 2 cores.
TINY = [
    "--set", "data.synthetic.num_train=480",
    "--set", "data.synthetic.num_test=240",
    "--batch-size", "48",
    "-q",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a CUDA device: skipped, not failed, on a machine without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def run_cli(*args: str) -> "CliResult":
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def interrupted_and_resumed(
    args: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, interrupt_at: int, label: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``teach args`` straight into tmp_path/straight, and into tmp_path/resumed with Ctrl-C at training step call
    ``interrupt_at`` (its stop line naming ``label``) then ``--resume``: the two runs' last weights."""
    from kdcli.engine import Trainer

    assert run_cli("teach", *args, "--out", tmp_path / "straight").exit_code == 0
    original, calls = Trainer.train_step, []

    def interrupted_step(self: Trainer, batch: object) -> object:
        calls.append(1)
        if len(calls) == interrupt_at:  # the loop saves the exact state before its next step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", interrupted_step)
        stopped = run_cli("teach", *args, "--out", tmp_path / "resumed")
    assert stopped.exit_code == 130 and label in stopped.stderr, stopped
    assert run_cli("teach", "--resume", tmp_path / "resumed", "-q").exit_code == 0
    straight, resumed = (safetensors.torch.load_file(tmp_path / run / "last.safetensors") for run in ("straight", "resumed"))
    return straight, resumed


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch standard teacher (cifar_resnet14) on tiny synthetic data."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = run_cli("teach", "--model", "cifar_resnet14", "--epochs", 3, "--out", out, *TINY)
    assert result.exit_code == 0, result
    return out
