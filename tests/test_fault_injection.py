"""Faults injected inside the process: Ctrl-C in an epoch, a crash before any save, non-finite losses, failing writes.

Each run that stops is then resumed with the fault gone and must end bit for
bit where an uninterrupted run ends (deterministic mode on CPU), method state included.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import resource
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_cli
from faults import DETERMINISTIC, MethodCase, assert_same_checkpoint, assert_same_run, method_cases, one_error_line
from kdcli.checkpoint import load_checkpoint, read_state_label
from kdcli.engine import Trainer
from kdcli.method import Method, StepOutput

EPOCHS = 2
STEPS_PER_EPOCH = 9  # TINY: 432 training samples in batches of 48
RUN = ["--epochs", EPOCHS, *DETERMINISTIC]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, teacher_run: Path) -> Callable[[MethodCase], Path]:
    """Uninterrupted reference runs, one per method, trained on first use."""
    runs: dict[str, Path] = {}

    def straight(case: MethodCase) -> Path:
        if case.method not in runs:
            out = tmp_path_factory.mktemp("straight") / case.method
            result = run_cli(*case.args(teacher_run), "--out", out, *RUN)
            assert result.exit_code == 0, result
            runs[case.method] = out
        return runs[case.method]

    return straight


STANDARD = MethodCase("standard", "teach", needs_teacher=False)


def at_global_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[], None]) -> None:
    """Run ``action`` inside the ``step``-th training step (1-based, counted over the whole run)."""
    original = Trainer.train_step
    count = 0

    def train_step(self: Trainer, batch: Any) -> Any:
        nonlocal count
        count += 1
        if count == step:
            action()
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("case", method_cases(), ids=lambda case: case.method)
def test_ctrl_c_inside_an_epoch_resumes_bit_exact(
    case: MethodCase, straight_runs: Callable[[MethodCase], Path], teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_in_epoch = random.Random(case.method).randint(1, STEPS_PER_EPOCH - 1)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        # The signal arrives during a step: that step finishes, then the state is saved.
        at_global_step(patch, STEPS_PER_EPOCH + step_in_epoch, lambda: os.kill(os.getpid(), signal.SIGINT))
        stopped = run_cli(*case.args(teacher_run), "--out", out, *RUN)
    assert stopped.exit_code == 130, stopped
    line = one_error_line(stopped.stderr)
    assert f"interrupted (SIGINT): saved the exact training state after step {step_in_epoch}/{STEPS_PER_EPOCH} of epoch 2" in line
    assert f"last.safetensors holds epoch 1); continue with: kdcli {case.job} --resume {out}" in line
    assert read_state_label(out / "resume.safetensors") == f"step {step_in_epoch}/{STEPS_PER_EPOCH} of epoch 2"

    finished = run_cli(case.job, "--resume", out, "-q")
    assert finished.exit_code == 0, finished
    assert_same_run(straight_runs(case), out)


class Crash(BaseException):
    """Stands in for a hard crash: nothing in kdcli catches it."""


def test_crash_before_the_first_save_resumes_from_scratch(straight_runs: Callable[[MethodCase], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"

    def crash() -> None:
        raise Crash

    with monkeypatch.context() as patch:
        at_global_step(patch, 5, crash)
        with pytest.raises(Crash):
            run_cli("teach", "--out", out, *RUN)
    assert sorted(path.name for path in out.iterdir()) == [".kdcli-run", "config.json"]

    finished = run_cli("teach", "--resume", out)  # not quiet: it says that it starts over
    assert finished.exit_code == 0, finished
    assert "no saved training state yet: starting at epoch 1 with its saved config" in finished.stderr
    assert_same_run(straight_runs(STANDARD), out)


def poison_loss(monkeypatch: pytest.MonkeyPatch, method: type[Method], term: str, at_steps: set[int]) -> None:
    """Make loss term ``term`` NaN at the given global steps."""
    original = method.training_step
    count = 0

    def training_step(self: Method, batch: Any) -> StepOutput:
        nonlocal count
        count += 1
        output = original(self, batch)
        if count in at_steps:
            output.losses[term] = output.losses[term] * float("nan")
        return output

    monkeypatch.setattr(method, "training_step", training_step)


def test_nonfinite_loss_stops_naming_epoch_step_and_term(straight_runs: Callable[[MethodCase], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli_plugins.standard import Standard

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        poison_loss(patch, Standard, "ce", {STEPS_PER_EPOCH + 3})  # not a progress-refresh step
        stopped = run_cli("teach", "--out", out, *RUN)
    assert stopped.exit_code == 1, stopped
    line = one_error_line(stopped.stderr)
    assert "loss term ce went non-finite (NaN or inf) in epoch 2 at step 3/9" in line
    assert f"{out / 'last.safetensors'} (epoch 1) is kept as it was" in line and "train.nonfinite_loss=skip" in line
    straight = straight_runs(STANDARD)
    assert_same_checkpoint(straight / "checkpoints" / "epoch_0001.safetensors", out / "last.safetensors")
    assert read_state_label(out / "resume.safetensors") == "epoch 1"

    # Nothing of the bad step reached the disk: once the cause is gone, the run ends as if it never happened.
    assert run_cli("teach", "--resume", out, "-q").exit_code == 0
    assert_same_run(straight, out)


def test_nonfinite_loss_steps_can_be_skipped_and_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli_plugins.standard import Standard

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        poison_loss(patch, Standard, "ce", {2, STEPS_PER_EPOCH + 4, STEPS_PER_EPOCH + 5})
        result = run_cli("teach", "--out", out, *RUN, "--set", "train.nonfinite_loss=skip", "--json")
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["skipped_steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["skipped_steps"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]["total"]) for record in records)
    # An applied NaN update would have spoiled every weight it touched.
    weights, _ = load_checkpoint(out / "last.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())


# -- failing writes ------------------------------------------------------------------------


def _path_of(descriptor: int) -> str:
    return os.readlink(f"/proc/self/fd/{descriptor}")


def fail_fsync(patch: pytest.MonkeyPatch, name_part: str, occurrence: int, code: int, *, directory: bool = False) -> None:
    """The ``occurrence``-th fsync of a temporary file (or, with ``directory``, of the directory after renaming it) named like ``name_part`` fails."""
    real_fsync = os.fsync
    seen = 0
    fail_next = False

    def fsync(descriptor: int) -> None:
        nonlocal seen, fail_next
        if fail_next:
            fail_next = False
            raise OSError(code, os.strerror(code))
        if name_part in os.path.basename(_path_of(descriptor)):
            seen += 1
            if seen == occurrence:
                if not directory:
                    raise OSError(code, os.strerror(code))
                fail_next = True
        real_fsync(descriptor)

    patch.setattr(os, "fsync", fsync)


def deny_temporary_files(patch: pytest.MonkeyPatch, name_part: str, occurrence: int) -> None:
    """Creating the ``occurrence``-th temporary file for ``name_part`` fails with EACCES (as on a read-only directory)."""
    real_mkstemp = tempfile.mkstemp
    seen = 0

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        if name_part in kwargs.get("prefix", ""):
            seen += 1
            if seen == occurrence:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    patch.setattr(tempfile, "mkstemp", mkstemp)


def limit_file_size_in_epoch_2_save(patch: pytest.MonkeyPatch) -> None:
    """A real kernel failure: RLIMIT_FSIZE makes writing the epoch-2 resume state fail with EFBIG."""
    original = Trainer.save

    def save(self: Trainer, epoch: int, record: dict[str, Any], *, improved: bool) -> None:
        if epoch != 2:
            return original(self, epoch, record, improved=improved)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))  # below the resume state, above config and metrics
        try:
            original(self, epoch, record, improved=improved)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    patch.setattr(Trainer, "save", save)


WRITE_FAILURES = {
    # case: (inject, what the message says, epoch resume.safetensors holds after, epoch last.safetensors holds after)
    "disk-full-resume-state": (lambda p: fail_fsync(p, "resume.safetensors", 2, errno.ENOSPC), "resume.safetensors (No space left on device); the previous resume.safetensors is unchanged", 1, 1),
    "permission-denied-last": (lambda p: deny_temporary_files(p, "last.safetensors", 2), "last.safetensors (Permission denied); the previous last.safetensors is unchanged", 2, 1),
    "quota-epoch-checkpoint": (lambda p: fail_fsync(p, "epoch_0002", 1, errno.EDQUOT), "epoch_0002.safetensors (Disk quota exceeded); nothing was written", 2, 2),
    "disk-full-metrics": (lambda p: fail_fsync(p, "metrics.jsonl", 2, errno.ENOSPC), "metrics.jsonl (No space left on device); the previous metrics.jsonl is unchanged", 2, 2),
    "directory-sync-last": (lambda p: fail_fsync(p, "last.safetensors", 2, errno.EIO, directory=True), "wrote {out}/last.safetensors but could not flush its directory to disk (Input/output error)", 2, 2),
    "file-too-large-for-real": (limit_file_size_in_epoch_2_save, "resume.safetensors (File too large); the previous resume.safetensors is unchanged", 1, 1),
}


@pytest.mark.parametrize("case", WRITE_FAILURES, ids=str)
def test_failed_write_keeps_previous_files_and_resumes(case: str, straight_runs: Callable[[MethodCase], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inject, message, resume_epoch, last_epoch = WRITE_FAILURES[case]
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        inject(patch)
        failed = run_cli("teach", "--out", out, *RUN)
    assert failed.exit_code == 1, failed
    line = one_error_line(failed.stderr)
    assert message.format(out=out) in line and "training stopped" in line, line
    assert f"resume.safetensors holds the state after epoch {resume_epoch}; once that is fixed, continue with: kdcli teach --resume {out}" in line
    straight = straight_runs(STANDARD)
    assert read_state_label(out / "resume.safetensors") == f"epoch {resume_epoch}"
    assert_same_checkpoint(straight / "checkpoints" / f"epoch_{last_epoch:04d}.safetensors", out / "last.safetensors")
    assert not list(out.rglob("*.tmp"))

    assert run_cli("teach", "--resume", out, "-q").exit_code == 0
    assert_same_run(straight, out)


def test_unwritable_run_directory_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        deny_temporary_files(patch, "config.json", 1)
        result = run_cli("teach", "--out", tmp_path / "run", *RUN)
    assert result.exit_code == 1, result
    assert "config.json (Permission denied); nothing was written" in one_error_line(result.stderr)
