"""--overwrite on seed groups, seeded sweeps and exports removes only what kdcli wrote, never a user's folder."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, run_cli


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def test_seed_group_overwrite_refuses_a_folder_kdcli_did_not_make(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "mine")
    result = run_cli("teach", "--model", "cifar_resnet8", "--epochs", 1, "--seeds", "0", "--out", folder, "--overwrite", *TINY)
    assert result.exit_code == 2 and "kdcli did not create it" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"


def test_export_overwrite_refuses_a_folder_with_other_files(teacher_run: Path, tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "mine")
    result = run_cli("export", teacher_run / "last.safetensors", folder, "--overwrite")
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"
    export = tmp_path / "export"
    assert run_cli("export", teacher_run / "last.safetensors", export).exit_code == 0
    (export / "model.safetensors").write_bytes(b"stale")
    assert run_cli("export", teacher_run / "last.safetensors", export, "--overwrite").exit_code == 0
    assert (export / "model.safetensors").read_bytes() != b"stale"
