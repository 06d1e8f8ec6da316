"""kdcli deletes only what it created, validates before it touches the disk, and never trusts a file's metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from kdcli.checkpoint import load_checkpoint, save_checkpoint
from kdcli.engine import Trainer
from kdcli.guards import NonFiniteLoss
from test_bad_input import assert_clean_error

SMALL = ["--model", "cifar_resnet8", "--epochs", 1, *TINY]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    out = tmp_path / "old"
    assert run_cli("teach", "--out", out, "--epochs", 2, *SMALL[:2], *TINY).exit_code == 0
    return out


@pytest.mark.parametrize("out", [".", ""])
def test_overwrite_refuses_the_working_directory(out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep me")
    assert_clean_error(run_cli("teach", "--out", out, "--overwrite", *SMALL), 2, "working directory")
    assert snapshot(tmp_path) == {"mine.txt": b"keep me"}


def test_overwrite_refuses_a_directory_kdcli_did_not_create(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # looks like a run, but carries no marker
    before = snapshot(folder)
    assert_clean_error(run_cli("teach", "--out", folder, "--overwrite", *SMALL), 2, "kdcli did not create it")
    assert snapshot(folder) == before


def test_overwrite_refuses_the_teachers_own_run(teacher_run: Path) -> None:
    before = snapshot(teacher_run)
    distill = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--out", teacher_run, "--overwrite", *SMALL)
    assert_clean_error(distill, 2, "reads", "inside it")
    sweep = run_cli("sweep-checkpoints", teacher_run, "--out", teacher_run, "--overwrite", "--epochs", 1, "-q")
    assert_clean_error(sweep, 2, "inside it")
    assert snapshot(teacher_run) == before


def test_failed_validation_leaves_old_run_and_no_new_directory(teacher_run: Path, small_run: Path, tmp_path: Path) -> None:
    before = snapshot(small_run)
    bad = ["distill", "--teacher", teacher_run / "last.safetensors", "--method", "feature-mimic", "--set", "method.layers=[99]", *SMALL]
    assert_clean_error(run_cli(*bad, "--out", small_run, "--overwrite"), 2, "method.layers")
    assert snapshot(small_run) == before
    fresh = tmp_path / "fresh"
    assert_clean_error(run_cli(*bad, "--out", fresh), 2, "method.layers")
    assert not fresh.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]


def test_replacement_removes_only_kdcli_files(small_run: Path) -> None:
    (small_run / "notes.txt").write_text("mine")
    (small_run / "checkpoints" / "keep.txt").write_text("mine too")
    assert run_cli("teach", "--out", small_run, "--overwrite", *SMALL).exit_code == 0
    files = set(snapshot(small_run))
    assert {"notes.txt", "checkpoints/keep.txt", ".kdcli-run", "last.safetensors"} <= files
    assert "checkpoints/epoch_0002.safetensors" not in files  # the old run's second epoch is gone
    assert len((small_run / "metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(path.name for path in small_run.parent.iterdir()) == ["old"]


def test_resume_keeps_user_tmp_files_and_files_follow_the_umask(small_run: Path) -> None:
    (small_run / ".draft.tmp").write_text("mine")
    (small_run / "notes.tmp").write_text("mine")
    assert run_cli("teach", "--resume", small_run, "-q").exit_code == 0
    assert (small_run / ".draft.tmp").exists() and (small_run / "notes.tmp").exists()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((small_run / "last.safetensors").stat().st_mode) == 0o666 & ~mask


def test_relative_teacher_is_stored_absolute(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(teacher_run.parent)
    out = tmp_path / "student"
    assert run_cli("distill", "--teacher", Path(teacher_run.name) / "last.safetensors", "--out", out, *SMALL).exit_code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["teacher"] == str(teacher_run / "last.safetensors")
    monkeypatch.chdir(tmp_path)
    (out / "resume.safetensors").unlink()  # start over from the saved config, from another directory
    assert run_cli("distill", "--resume", out, "-q").exit_code == 0


def test_crafted_checkpoint_cannot_choose_download_or_root(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest proves integrity, not origin: anyone can sign metadata that asks for a download into a root of theirs."""
    weights, info = load_checkpoint(teacher_run / "last.safetensors")
    foreign = tmp_path / "elsewhere" / "theirs"
    crafted = tmp_path / "crafted.safetensors"
    save_checkpoint(crafted, weights, dataclasses.replace(info, data={"name": "cifar10", "root": str(foreign), "download": True}))
    attempts: list[object] = []

    def no_network(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert_clean_error(run_cli("eval", crafted), 1, "--download")
    assert attempts == [] and not (tmp_path / "elsewhere").exists()
    assert list(work.iterdir()) == []


def test_sweep_takes_no_data_location_from_teacher_runs(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "teacher"
    for name, payload in snapshot(teacher_run).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(payload)
    config = json.loads((copy / "config.json").read_text())
    foreign = tmp_path / "elsewhere"
    config["data"] |= {"name": "cifar10", "root": str(foreign), "download": True}
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    result = run_cli("sweep-checkpoints", copy, "--out", tmp_path / "sweep", "--epochs", 1, "-q")
    assert_clean_error(result, 1, "--download")
    assert not foreign.exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("failure", "code"), [(KeyboardInterrupt, 130), (NonFiniteLoss("loss term ce went non-finite"), 1)])
def test_replacement_that_fails_before_its_first_state_keeps_the_old_run(
    failure: BaseException, code: int, small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(self: Trainer, epoch: int) -> dict:
        raise failure

    monkeypatch.setattr(Trainer, "train_epoch", fails)
    before = snapshot(small_run)
    result = run_cli("teach", "--out", small_run, "--overwrite", *SMALL)
    assert result.exit_code == code, result
    assert snapshot(small_run) == before
    assert sorted(path.name for path in small_run.parent.iterdir()) == ["old"], "the staged run was left behind"
