"""Every bad input gets one clear line on stderr, a non-zero exit, and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli


def assert_clean_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: "), result
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], result


def test_unknown_method_suggests_close_names(tmp_path: Path) -> None:
    assert_clean_error(run_cli("teach", "--method", "standrd", "--out", tmp_path / "r"), 2, "unknown method 'standrd'", "standard")
    assert not (tmp_path / "r").exists()


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    result = run_cli("teach", "--model", "cifar_resnet9", "--out", tmp_path / "r", *TINY)
    assert_clean_error(result, 2, "unknown model 'cifar_resnet9'", "did you mean")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--lr", "-0.1"], "optim.lr"),
        (["--lr", "0"], "optim.lr"),
        (["--batch-size", "0"], "train.batch_size"),
        (["--epochs", "-2"], "train.epochs"),
        (["--set", "optim.nosuchkey=1"], "optim.nosuchkey"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--set", "method.temperature=4"], "method.temperature"),  # standard has no temperature
        (["--set", "noequals"], "KEY=VALUE"),
        (["--val-split", "1.5"], "data.val_split"),
    ],
)
def test_invalid_config_values_name_the_key(tmp_path: Path, flags: list[str], fragment: str) -> None:
    assert_clean_error(run_cli("teach", "--out", tmp_path / "r", *flags), 2, fragment)
    assert not (tmp_path / "r").exists()


def test_wrong_value_type_for_method_hyperparameter(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--set", "method.temperature=hot", "--out", tmp_path / "s")
    assert_clean_error(result, 2, "method.temperature", "hot")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_clean_error(run_cli("teach", "--config", tmp_path / "nope.toml"), 2, "config file not found")


def test_existing_run_directory_is_refused(teacher_run: Path) -> None:
    before = (teacher_run / "last.safetensors").read_bytes()
    assert_clean_error(run_cli("teach", "--out", teacher_run, *TINY), 2, "already exists", "--resume", "--overwrite")
    assert (teacher_run / "last.safetensors").read_bytes() == before


def test_teacher_rules(teacher_run: Path, tmp_path: Path) -> None:
    ckpt = teacher_run / "last.safetensors"
    assert_clean_error(run_cli("distill", "--out", tmp_path / "a"), 2, "needs a teacher", "--teacher")
    assert_clean_error(run_cli("distill", "--method", "standard", "--teacher", ckpt, "--out", tmp_path / "b"), 2, "no teacher", "drop --teacher")
    assert_clean_error(run_cli("teach", "--method", "kd", "--out", tmp_path / "c"), 2, "not a teach method")


def test_missing_truncated_and_foreign_checkpoints(teacher_run: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("eval", tmp_path / "missing.safetensors"), 1, "checkpoint not found")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((teacher_run / "last.safetensors").read_bytes()[:1000])
    assert_clean_error(run_cli("eval", truncated), 1, "not a readable safetensors file")
    pickled = tmp_path / "model.safetensors"
    torch.save({"model": {"w": torch.zeros(2)}}, pickled)  # a pickle: must be refused, never loaded
    assert_clean_error(run_cli("eval", pickled), 1, "not a readable safetensors file")
    assert_clean_error(run_cli("distill", "--teacher", truncated, "--out", tmp_path / "s"), 1, "not a readable safetensors file")


def test_checkpoint_that_does_not_fit_the_data(teacher_run: Path, tmp_path: Path) -> None:
    ckpt = teacher_run / "last.safetensors"
    classes = run_cli("distill", "--teacher", ckpt, "--set", "data.synthetic.num_classes=5", "--out", tmp_path / "a", *TINY)
    assert_clean_error(classes, 2, "predicts 10 classes", "has 5")
    shape = run_cli("distill", "--teacher", ckpt, "--set", "data.synthetic.image_size=24", "--out", tmp_path / "b", *TINY)
    assert_clean_error(shape, 2, "(3, 16, 16)", "(3, 24, 24)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cifar_root_without_files_points_to_download(tmp_path: Path) -> None:
    result = run_cli("teach", "--data", "cifar100", "--data-root", tmp_path, "--out", tmp_path / "r")
    assert_clean_error(result, 1, str(tmp_path), "--download")


def test_unknown_data_set_and_eval_split(teacher_run: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("teach", "--data", "cifar1000", "--out", tmp_path / "r"), 2, "unknown data set", "cifar100")
    assert_clean_error(run_cli("eval", teacher_run / "last.safetensors", "--split", "holdout"), 2, "--split")


def test_resume_rejects_other_flags_and_non_run_dirs(teacher_run: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("teach", "--resume", teacher_run, "--epochs", 5), 2, "drop --epochs")
    assert_clean_error(run_cli("teach", "--resume", tmp_path), 2, "not a kdcli run directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["teach", "--epochs", "x"], "--epochs"),
        (["teach", "--bogus"], "No such option: --bogus"),
        (["distill", "--teacher"], "--teacher"),
        (["eval"], "Missing argument"),
        (["methods", "show"], "Missing argument"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    assert_clean_error(run_cli(*args), 2, fragment)


def test_unknown_method_in_methods_show() -> None:
    assert_clean_error(run_cli("methods", "show", "kdd"), 2, "unknown method 'kdd'", "kd")
