"""Nothing lost: every command that writes replaces only files kdcli wrote and recorded, never through a link,
never onto its own input, and checks all of that before it changes anything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli
from test_bad_input import assert_clean_error


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links, not followed) and what it holds."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "dir"
    return entries


@pytest.fixture(scope="module")
def export_dir(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine export, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("export") / "hub"
    assert run_cli("export", teacher_run / "last.safetensors", out).exit_code == 0
    return out


@pytest.fixture()
def exported(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "hub", symlinks=True))


# -- seed groups ------------------------------------------------------------------------------------------


SEEDS = ["teach", "--model", "cifar_resnet8", "--epochs", 1, *TINY]


def test_seed_group_overwrite_refuses_a_folder_kdcli_did_not_make(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "mine")
    result = run_cli(*SEEDS, "--seeds", "0", "--out", folder, "--overwrite")
    assert result.exit_code == 2 and "kdcli did not create it" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"


def test_seed_group_overwrite_refused_later_loses_nothing(tmp_path: Path) -> None:
    group = tmp_path / "group"
    assert run_cli(*SEEDS, "--seeds", "0-1", "--out", group).exit_code == 0
    before = snapshot(group)
    # Valid flags, but a split too small for one batch: found only once the data is loaded.
    refused = run_cli(*SEEDS, "--seeds", "0-1", "--out", group, "--overwrite", "--val-split", "0.95", "--set", "data.synthetic.num_train=20")
    assert_clean_error(refused, 2, "too few for one batch")
    assert snapshot(group) == before
    again = run_cli(*SEEDS, "--seeds", "0-1", "--out", group)  # the old recipe's group, read back
    assert again.exit_code == 0 and snapshot(group) == before


def test_seed_group_overwrite_retrains_and_drops_old_seeds(tmp_path: Path) -> None:
    group = tmp_path / "group"
    assert run_cli(*SEEDS, "--seeds", "0-1", "--out", group).exit_code == 0
    (group / "seed-0" / "notes.txt").write_text("mine")
    first = json.loads((group / "seed-0" / "summary.json").read_text())
    result = run_cli(*SEEDS, "--seeds", "0", "--epochs", 2, "--out", group, "--overwrite", "--json")
    assert result.exit_code == 0, result
    assert json.loads((group / "seed-0" / "config.json").read_text())["train"]["epochs"] == 2
    assert json.loads((group / "seed-0" / "summary.json").read_text()) != first
    assert (group / "seed-0" / "notes.txt").read_text() == "mine"
    assert not (group / "seed-1").exists()


def test_seed_folder_kdcli_did_not_make_is_refused_before_training(tmp_path: Path) -> None:
    group = tmp_path / "group"
    assert run_cli(*SEEDS, "--seeds", "0", "--out", group).exit_code == 0
    user_folder(group / "seed-5")
    before = snapshot(group)
    assert_clean_error(run_cli(*SEEDS, "--seeds", "0,5", "--out", group, "--overwrite"), 2, "seed-5", "kdcli did not create it")
    assert snapshot(group) == before


# -- export -----------------------------------------------------------------------------------------------


def test_export_overwrite_refuses_a_folder_with_other_files(teacher_run: Path, tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "mine")
    result = run_cli("export", teacher_run / "last.safetensors", folder, "--overwrite")
    assert_clean_error(result, 2, "refusing to overwrite", ".kdcli-export.json")
    assert snapshot(folder) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_export_overwrite_replaces_its_own_export_and_keeps_the_users_files(exported: Path, teacher_run: Path) -> None:
    (exported / "LICENSE").write_text("mine")
    card = (exported / "README.md").read_bytes()
    earlier = sorted((teacher_run / "checkpoints").glob("*.safetensors"))[0]
    assert run_cli("export", earlier, exported, "--overwrite").exit_code == 0
    assert (exported / "LICENSE").read_text() == "mine" and (exported / "README.md").read_bytes() != card
    recorded = json.loads((exported / ".kdcli-export.json").read_text())["files"]
    assert recorded["README.md"] == [hashlib.sha256((exported / "README.md").read_bytes()).hexdigest()]


@pytest.mark.parametrize("name", ["README.md", "config.json", "model.safetensors"])
def test_export_overwrite_refuses_a_file_the_user_changed(exported: Path, teacher_run: Path, name: str) -> None:
    (exported / name).write_bytes(b"my own " + name.encode())
    before = snapshot(exported)
    assert_clean_error(run_cli("export", teacher_run / "last.safetensors", exported, "--overwrite"), 2, f"refusing to overwrite {exported / name}")
    assert snapshot(exported) == before


def test_export_refuses_to_replace_its_own_input(exported: Path) -> None:
    before = snapshot(exported)
    result = run_cli("export", exported / "model.safetensors", exported, "--overwrite")
    assert_clean_error(result, 2, "this command reads it")
    assert snapshot(exported) == before


def test_export_never_writes_through_a_link(exported: Path, teacher_run: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.json"
    precious.write_text("{}")
    (exported / "config.json").unlink()
    (exported / "config.json").symlink_to(precious)
    before = snapshot(exported)
    assert_clean_error(run_cli("export", teacher_run / "last.safetensors", exported, "--overwrite"), 2, "symbolic link")
    assert snapshot(exported) == before and precious.read_text() == "{}"


# -- plot -------------------------------------------------------------------------------------------------


def test_plot_never_writes_through_a_link(teacher_run: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.safetensors"
    shutil.copy(teacher_run / "last.safetensors", checkpoint)
    link = tmp_path / "curves.png"
    link.symlink_to(checkpoint)
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("plot", teacher_run, "-o", link), 2, "symbolic link")
    assert snapshot(tmp_path) == before


def test_plot_replaces_only_a_plot_it_drew(teacher_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    mine = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(mine)
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("plot", teacher_run, "-o", mine), 2, "kdcli did not draw it")
    assert snapshot(tmp_path) == before
    drawn = tmp_path / "curves.png"
    assert run_cli("plot", teacher_run, "-o", drawn).exit_code == 0
    assert run_cli("plot", teacher_run, teacher_run, "-o", drawn).exit_code == 0  # its own plot: replaced
    assert_clean_error(run_cli("plot", teacher_run, "-o", tmp_path), 2, "name a .png file")


# -- convert ----------------------------------------------------------------------------------------------


@pytest.fixture()
def pth(tmp_path: Path) -> Path:
    import timm

    import kdcli.models  # noqa: F401 -- registers the cifar zoo

    path = tmp_path / "model.pth"
    torch.save(timm.create_model("cifar_resnet8", num_classes=10).state_dict(), path)
    return path


def test_convert_replaces_only_a_kdcli_checkpoint(pth: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not mine to replace")
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("convert", pth, "--arch", "cifar_resnet8", "-o", foreign, "--overwrite"), 2, "not a kdcli checkpoint")
    assert snapshot(tmp_path) == before
    output = tmp_path / "kdcli.safetensors"
    assert run_cli("convert", pth, "--arch", "cifar_resnet8", "-o", output).exit_code == 0
    assert run_cli("convert", pth, "--arch", "cifar_resnet8", "-o", output, "--overwrite").exit_code == 0


def test_convert_never_writes_through_a_link(pth: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.safetensors"
    link.symlink_to(pth)
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("convert", pth, "--arch", "cifar_resnet8", "-o", link, "--overwrite"), 2, "symbolic link")
    assert snapshot(tmp_path) == before


# -- teach, distill, sweep ---------------------------------------------------------------------------------


def test_teach_resume_never_writes_through_a_link(teacher_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to(precious)
    result = run_cli("teach", "--resume", run, "-q")
    assert result.exit_code != 0 and "symbolic link" in result.stderr and "Traceback" not in result.stderr, result
    assert precious.read_text() == "mine" and (run / "summary.json").is_symlink()


def test_distill_refuses_to_replace_the_run_holding_its_teacher(teacher_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    before = snapshot(run)
    result = run_cli("distill", "--teacher", run / "last.safetensors", "--out", run, "--overwrite", "--epochs", 1, *TINY)
    assert_clean_error(result, 2, "reads", "inside it")
    assert snapshot(run) == before


def test_sweep_never_writes_through_a_link(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    precious = tmp_path / "precious.csv"
    precious.write_text("mine")
    (out / "results.csv").symlink_to(precious)
    result = run_cli("sweep-checkpoints", teacher_run, "--every", 3, "--model", "cifar_resnet8", "--epochs", 1, "--out", out, *TINY)
    assert result.exit_code != 0 and "Traceback" not in result.stderr, result
    assert precious.read_text() == "mine" and (out / "results.csv").is_symlink()
