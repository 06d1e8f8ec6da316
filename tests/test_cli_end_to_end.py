"""teach -> distill -> eval through the real CLI on tiny synthetic data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY, run_cli
from kdcli.checkpoint import read_checkpoint_info
from kdcli.jobs.common import model_from_checkpoint


def test_teach_writes_a_complete_run_directory(teacher_run: Path) -> None:
    config = json.loads((teacher_run / "config.json").read_text())
    assert config["method"]["name"] == "standard"
    assert config["model"]["name"] == "cifar_resnet14"
    records = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    for record in records:
        assert set(record["loss"]) == {"ce", "total"}
        assert 0.0 <= record["val_top1"] <= 1.0 and record["time_s"] > 0 and record["lr"] > 0
    # Training learns: the loss goes down over three epochs.
    assert records[-1]["loss"]["total"] < records[0]["loss"]["total"]
    saved = sorted(path.name for path in (teacher_run / "checkpoints").iterdir())
    assert saved == ["epoch_0001.safetensors", "epoch_0002.safetensors", "epoch_0003.safetensors"]
    assert (teacher_run / "last.safetensors").is_file() and (teacher_run / "resume.safetensors").is_file()
    info = read_checkpoint_info(teacher_run / "last.safetensors")
    assert (info.arch, info.num_classes, info.input_size, info.epoch, info.method) == ("cifar_resnet14", 10, (3, 16, 16), 3, "standard")
    assert info.data["name"] == "synthetic" and "val_top1" in info.metrics


def test_distill_and_eval_end_to_end(teacher_run: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    result = run_cli(
        "distill", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8",
        "--epochs", 2, "--out", student, "--set", "method.temperature=2", "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["method"] == "kd" and summary["teacher_arch"] == "cifar_resnet14"
    assert set(summary["final_epoch"]["loss"]) == {"ce", "kd", "total"}
    for report in (summary["test"], summary["teacher_test"]):
        assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    # The teacher's row is the teacher's: an independent evaluation of its checkpoint agrees (the student's would not).
    teacher_eval = evaluate(teacher_run / "last.safetensors")
    for key in ("top1", "top5", "nll", "ece"):
        assert summary["teacher_test"][key] == pytest.approx(teacher_eval[key], abs=1e-6), key
    assert summary["teacher_test"]["nll"] != pytest.approx(summary["test"]["nll"], abs=1e-6)
    assert json.loads((student / "config.json").read_text())["method"]["temperature"] == 2

    evaluation = run_cli("eval", student / "last.safetensors", "--json")
    assert evaluation.exit_code == 0, evaluation
    report = evaluation.json()
    metrics = report["metrics"]
    assert report["split"] == "test" and report["num_samples"] == 240
    assert metrics["top1"] == pytest.approx(summary["test"]["top1"])
    for key in ("nll", "ece", "brier", "pstar_tv_train", "pstar_sq_l2_train", "pstar_tv_test", "pstar_sq_l2_test"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0
    assert 0 <= metrics["pstar_tv_test"] <= 1

    table = run_cli("eval", student / "last.safetensors", "--split", "val")
    assert table.exit_code == 0 and "top1" in table.stdout and "pstar_tv_train" in table.stdout


def test_checkpoint_loads_into_plain_timm_without_kdcli(teacher_run: Path) -> None:
    path = teacher_run / "last.safetensors"
    weights = safetensors.torch.load_file(path)
    model = timm.create_model("cifar_resnet14", num_classes=10)
    model.load_state_dict(weights)  # strict: same key names, same shapes
    model.eval()
    kdcli_model, _ = model_from_checkpoint(path)
    kdcli_model.eval()
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        plain = model(images)
        assert plain.shape == (4, 10)
        assert torch.equal(plain, kdcli_model(images))


def test_methods_list_and_show() -> None:
    listing = run_cli("methods", "list", "--json")
    assert listing.exit_code == 0
    names = {row["name"]: row for row in listing.json()}
    assert {"standard", "kd"} <= set(names)
    assert names["kd"]["roles"] == ["distill"] and names["kd"]["distribution"] == "kdcli"
    shown = run_cli("methods", "show", "kd", "--json").json()
    params = {row["name"]: row for row in shown["params"]}
    assert params["temperature"]["default"] == 4.0 and params["kl_reduction"]["default"] == "batchmean"
    assert params["ce_weight"]["default"] == 0.1 and params["kd_weight"]["default"] == 0.9


def test_config_file_and_set_layering(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[train]\nepochs = 1\n[optim]\nlr = 0.02\n[model]\nname = "cifar_resnet8"\n')
    out = tmp_path / "run"
    result = run_cli("teach", "--config", config, "--lr", "0.03", "--set", "optim.momentum=0.8", "--out", out, *TINY)
    assert result.exit_code == 0, result
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["optim"]["lr"] == 0.03 and resolved["optim"]["momentum"] == 0.8
    assert resolved["model"]["name"] == "cifar_resnet8"


def test_keep_best_and_early_stopping(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # At lr 0.6 validation accuracy rises, then falls (seeded), so patience 1 stops before 6 epochs.
    result = run_cli(
        "teach", "--model", "cifar_resnet8", "--epochs", 6, "--lr", "0.6", "--set", "train.early_stop_patience=1",
        "--out", out, "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda record: record["val_top1"])
    assert summary["best_epoch"] == best["epoch"]
    # Patience 1: the run ends one epoch after its best, well before the 6 planned (seeded, so always here).
    assert len(records) == best["epoch"] + 1 < 6
    assert records[-1]["val_top1"] < best["val_top1"] and best["val_top1"] > records[0]["val_top1"]  # neither first nor last
    compared = run_cli("compare", out, "--json").json()[0]["metrics"]
    assert compared["best/epoch"]["mean"] == best["epoch"] and compared["best/val_top1"]["mean"] == best["val_top1"]
    assert summary["epochs"] == len(records)
    assert read_checkpoint_info(out / "best.safetensors").epoch == best["epoch"]
    # Independent evaluations of best.safetensors: its val top-1 is the best epoch's, its test report the summary's.
    assert evaluate(out / "best.safetensors", "--split", "val")["top1"] == pytest.approx(best["val_top1"], abs=1e-6)
    best_test = evaluate(out / "best.safetensors")
    assert summary["test"]["top1"] == pytest.approx(best_test["top1"], abs=1e-6)
    assert summary["test"]["nll"] == pytest.approx(best_test["nll"], abs=1e-5)


def evaluate(checkpoint: Path, *args: str) -> dict[str, float]:
    """``kdcli eval`` of one checkpoint: the independent measurement summaries are compared with."""
    result = run_cli("eval", checkpoint, *args, "--json")
    assert result.exit_code == 0, result
    return result.json()["metrics"]


def test_keep_best_needs_a_validation_split(tmp_path: Path) -> None:
    result = run_cli("teach", "--val-split", "0", "--set", "train.keep_best=true", "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 2 and "data.val_split above 0" in result.stderr


def test_timm_checkpoint_loads_in_a_process_without_kdcli(tmp_path: Path) -> None:
    out = tmp_path / "timm_run"
    assert run_cli("teach", "--model", "resnet10t", "--epochs", 1, "--out", out, *TINY).exit_code == 0
    script = (
        "import sys, timm, torch, safetensors.torch\n"
        "model = timm.create_model('resnet10t', num_classes=10)\n"
        f"model.load_state_dict(safetensors.torch.load_file({str(out / 'last.safetensors')!r}))\n"
        "assert not any(name.startswith('kdcli') for name in sys.modules)\n"
        "print(model.eval()(torch.rand(2, 3, 16, 16)).shape)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "torch.Size([2, 10])" in completed.stdout
