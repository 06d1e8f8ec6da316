"""Every bad input gets one clear line on stderr, a non-zero exit, and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli


def assert_clean_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result
    # One-line ``warning:`` notes (a weak teacher) may precede the failure; they are not part of it.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: "), result
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], result


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    result = run_cli("teach", "--model", "cifar_resnet9", "--out", tmp_path / "r", *TINY)
    assert_clean_error(result, 2, "unknown model 'cifar_resnet9'", "did you mean")


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


# Every command, wrong in as many ways: (arguments, exit code, a fragment of the one-line message).
# {tmp} is a fresh directory, {teacher} a teacher checkpoint, {run} its run directory, {state} its resume state.
BAD_INVOCATIONS = {
    "teach-unknown-method": (["teach", "--method", "standrd"], 2, "unknown method 'standrd'; did you mean standard"),
    "teach-negative-lr": (["teach", "--lr", "-0.1"], 2, "optim.lr"),
    "teach-zero-lr": (["teach", "--lr", "0"], 2, "optim.lr"),
    "teach-zero-batch": (["teach", "--batch-size", "0"], 2, "train.batch_size"),
    "teach-negative-epochs": (["teach", "--epochs", "-2"], 2, "train.epochs"),
    "teach-epochs-not-int": (["teach", "--epochs", "x"], 2, "--epochs"),
    "teach-unknown-option": (["teach", "--bogus"], 2, "No such option: --bogus"),
    "teach-unknown-key": (["teach", "--set", "optim.nosuchkey=1"], 2, "optim.nosuchkey"),
    "teach-wrong-type": (["teach", "--set", "train.epochs=many"], 2, "train.epochs"),
    "teach-key-of-other-method": (["teach", "--set", "method.temperature=4"], 2, "method.temperature"),
    "teach-set-without-value": (["teach", "--set", "noequals"], 2, "KEY=VALUE"),
    "teach-set-below-a-value": (["teach", "--epochs", "3", "--set", "train.epochs.x=1"], 2, "epochs is a value, not a section"),
    "teach-val-split-above-1": (["teach", "--val-split", "1.5"], 2, "data.val_split"),
    "teach-unknown-nonfinite-policy": (["teach", "--set", "train.nonfinite_loss=ignore"], 2, "train.nonfinite_loss"),
    "teach-best-without-validation": (["teach", "--set", "train.keep_best=true", "--val-split", "0"], 2, "set data.val_split above 0"),
    "teach-missing-config": (["teach", "--config", "{tmp}/nope.toml"], 2, "config file not found"),
    "teach-unparsable-config": (["teach", "--config", "{tmp}/broken.toml"], 2, "cannot parse config file"),
    "teach-config-not-a-mapping": (["teach", "--config", "{tmp}/list.yaml"], 2, "table/mapping at the top level"),
    "teach-config-unknown-suffix": (["teach", "--config", "{tmp}/config.txt"], 2, "must end in .toml, .yaml, .yml or .json"),
    "teach-config-not-text": (["teach", "--config", "{tmp}/binary.json"], 2, "not UTF-8 text"),
    "teach-distill-method": (["teach", "--method", "kd"], 2, "not a teach method"),
    "teach-unknown-data": (["teach", "--data", "cifar1000"], 2, "unknown data set 'cifar1000'"),
    "teach-cifar-not-downloaded": (["teach", "--data", "cifar100", "--data-root", "{tmp}/empty"], 1, "--download"),
    "teach-existing-run": (["teach", "--out", "{run}", *TINY], 2, "already exists"),
    "teach-out-is-a-file": (["teach", "--out", "{tmp}/file.txt", *TINY], 2, "exists and is not a directory"),
    "teach-accumulate-zero": (["teach", "--accumulate", "0"], 2, "train.accumulate_steps"),
    "teach-accumulate-uneven": (["teach", "--accumulate", "5", *TINY], 2, "do not split into 5 equal micro-batches"),
    "teach-accumulate-to-single-samples": (["teach", "--accumulate", "48", *TINY], 2, "in 48 micro-batches gives each process batches of 1 sample"),
    "teach-ema-above-1": (["teach", "--ema", "1.5"], 2, "train.ema_decay"),
    "teach-ema-zero": (["teach", "--ema", "0"], 2, "train.ema_decay"),
    "teach-ema-negative": (["teach", "--ema", "-0.5"], 2, "train.ema_decay"),
    "teach-sync-bn-without-torchrun": (["teach", "--sync-bn", *TINY], 2, "run under torchrun"),
    "teach-layer-decay-above-1": (["teach", "--set", "optim.layer_decay=1.5"], 2, "optim.layer_decay"),
    "distill-sync-bn-without-torchrun": (["distill", "--teacher", "{teacher}", "--sync-bn", *TINY], 2, "run under torchrun"),
    "teach-cuda-missing": (["teach", "--device", "cuda", *TINY], 1, "no CUDA device"),
    "teach-fp16-on-cpu": (["teach", "--device", "cpu", "--set", "train.precision=fp16", *TINY], 1, "fp16 needs a CUDA device"),
    "resume-with-flags": (["teach", "--resume", "{run}", "--epochs", "5"], 2, "drop --epochs"),
    "resume-not-a-run": (["teach", "--resume", "{tmp}"], 2, "not a kdcli run directory"),
    "resume-missing-dir": (["teach", "--resume", "{tmp}/nowhere"], 2, "not a kdcli run directory"),
    "distill-no-teacher": (["distill"], 2, "needs a teacher"),
    "distill-teacher-flag-without-value": (["distill", "--teacher"], 2, "--teacher"),
    "distill-teacher-for-teacherless-method": (["distill", "--method", "standard", "--teacher", "{teacher}"], 2, "drop --teacher"),
    "distill-missing-teacher": (["distill", "--teacher", "{tmp}/missing.safetensors"], 1, "checkpoint not found"),
    "distill-teacher-is-a-directory": (["distill", "--teacher", "{tmp}"], 1, "not a file"),
    "distill-teacher-is-a-resume-state": (["distill", "--teacher", "{state}"], 1, "not a kdcli checkpoint"),
    "distill-teacher-is-a-pickle": (["distill", "--teacher", "{tmp}/pickled.pt"], 1, "not a readable safetensors file"),
    "distill-hyperparameter-type": (["distill", "--teacher", "{teacher}", "--set", "method.temperature=hot"], 2, "method.temperature"),
    "distill-hyperparameter-choice": (["distill", "--teacher", "{teacher}", "--set", "method.kl_reduction=sum"], 2, "method.kl_reduction"),
    "distill-teacher-other-classes": (["distill", "--teacher", "{teacher}", "--set", "data.synthetic.num_classes=5", *TINY], 2, "predicts 10 classes"),
    "distill-resume-with-teacher": (["distill", "--resume", "{run}", "--teacher", "{teacher}"], 2, "drop --teacher"),
    "eval-no-checkpoint": (["eval"], 2, "Missing argument"),
    "eval-missing-checkpoint": (["eval", "{tmp}/missing.safetensors"], 1, "checkpoint not found"),
    "eval-unknown-split": (["eval", "{teacher}", "--split", "holdout"], 2, "--split"),
    "eval-zero-batch": (["eval", "{teacher}", "--batch-size", "0"], 2, "--batch-size"),
    "eval-unknown-device": (["eval", "{teacher}", "--device", "tpu"], 2, "invalid --device"),
    "eval-unknown-data": (["eval", "{teacher}", "--data", "nope"], 2, "unknown data set 'nope'"),
    "eval-pickle": (["eval", "{tmp}/pickled.pt"], 1, "not a readable safetensors file"),
    "methods-show-nothing": (["methods", "show"], 2, "Missing argument"),
    "methods-show-unknown": (["methods", "show", "kdd"], 2, "unknown method 'kdd'"),
    "methods-list-unknown-option": (["methods", "list", "--bogus"], 2, "No such option"),
    "methods-unknown-command": (["methods", "nosuch"], 2, "No such command"),
    "unknown-command": (["nosuchcommand"], 2, "No such command"),
    "unknown-root-option": (["--bogus"], 2, "No such option"),
}


def bad_input_files(tmp: Path) -> None:
    (tmp / "broken.toml").write_text("epochs = = 3\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "config.txt").write_text("epochs: 3\n")
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00{")
    (tmp / "file.txt").write_text("not a directory\n")
    (tmp / "empty").mkdir()
    torch.save({"model": {"w": torch.zeros(2)}}, tmp / "pickled.pt")  # a pickle: refused, never loaded


@pytest.mark.parametrize(("args", "code", "fragment"), BAD_INVOCATIONS.values(), ids=BAD_INVOCATIONS.keys())
def test_bad_invocation(args: list[str], code: int, fragment: str, teacher_run: Path, tmp_path: Path) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("valid where CUDA is available")
    bad_input_files(tmp_path)
    places = {"tmp": tmp_path, "teacher": teacher_run / "last.safetensors", "run": teacher_run, "state": teacher_run / "resume.safetensors"}
    arguments = [str(arg).format(**places) for arg in args]
    trains = arguments[0] in ("teach", "distill") and not {"--out", "--resume"} & set(arguments)
    out = tmp_path / "out"
    if trains:
        arguments[1:1] = ["--out", str(out)]
    before = {path: path.stat().st_mtime_ns for path in teacher_run.rglob("*")}
    assert_clean_error(run_cli(*arguments), code, fragment)
    assert not out.exists(), "a bad invocation created its run directory"
    assert before == {path: path.stat().st_mtime_ns for path in teacher_run.rglob("*")}, "a bad invocation touched another run"


def test_the_matrix_covers_every_command() -> None:
    commands = {" ".join(args[:2]) if args[0] == "methods" else args[0] for args, _, _ in BAD_INVOCATIONS.values()}
    assert {"teach", "distill", "eval", "methods show", "methods list"} <= commands and len(BAD_INVOCATIONS) >= 25
