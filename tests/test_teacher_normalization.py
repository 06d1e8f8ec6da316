"""A teacher sees the student's inputs in its own normalization (the mean/std stored in its checkpoint), a timm
teacher at its pretrained input size and interpolation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY, run_cli
from kdcli.checkpoint import load_checkpoint, save_checkpoint
from kdcli.config import load_resolved_config
from kdcli.data.augment import normalize
from kdcli.inference import predict
from kdcli.jobs.common import load_data, model_from_checkpoint, pretrained_resize, pretrained_timm_model
from kdcli.features import feature_shapes
from kdcli.metrics import classification_report, topk_accuracy
from kdcli.step import Batch
from kdcli.teacher import FrozenTeacher, Renormalization, Resize

OWN = ((0.2, 0.3, 0.4), (0.5, 0.6, 0.7))


def test_renormalization_re_expresses_inputs_in_the_teachers_normalization() -> None:
    data = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = torch.randint(256, (4, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 5))
    teacher = FrozenTeacher(network, Renormalization(data, OWN))
    logits = teacher.logits(Batch(normalize(pixels, *data), torch.zeros(4, dtype=torch.int64), torch.arange(4)))
    torch.testing.assert_close(logits, network(normalize(pixels, *OWN)), rtol=1e-5, atol=1e-5)


def test_distill_feeds_the_teacher_its_own_normalization(teacher_run: Path, tmp_path: Path) -> None:
    weights, info = load_checkpoint(teacher_run / "last.safetensors")
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, weights, dataclasses.replace(info, mean=OWN[0], std=OWN[1]))
    result = run_cli("distill", "--teacher", teacher, "--epochs", 1, "--out", tmp_path / "student", "--json", *TINY)
    assert result.exit_code == 0, result
    summary = json.loads(result.stdout)
    evaluated = json.loads(run_cli("eval", teacher, "--json").stdout)["metrics"]["top1"]  # eval uses the file's normalization
    assert summary["teacher_test"]["top1"] == evaluated
    bundle = load_data(load_resolved_config(tmp_path / "student" / "config.json").data)
    network, _ = model_from_checkpoint(teacher)
    with_data_set_normalization = predict(network, bundle.test, mean=bundle.mean, std=bundle.std, device=torch.device("cpu"), batch_size=256)
    assert topk_accuracy(with_data_set_normalization, bundle.test.targets, 1) != evaluated  # the test can tell the two apart


def write_pretrained_folder(folder: Path) -> torch.nn.Module:
    """A timm ``local-dir:`` model folder, as the Hub holds one: config.json with its pretrained config, model.safetensors."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    folder.mkdir()
    safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors")
    config = {"architecture": "test_resnet", "num_classes": 10,
              "pretrained_cfg": {"input_size": [3, 160, 160], "mean": list(OWN[0]), "std": list(OWN[1]), "interpolation": "bicubic"}}
    (folder / "config.json").write_text(json.dumps(config))
    return model.eval()


def bicubic_160(inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """What the pretrained config of ``write_pretrained_folder`` asks for: 160 px, bicubic (antialiased, as torchvision)."""
    return torch.nn.functional.interpolate(inputs, size=(160, 160), mode="bicubic", align_corners=False, antialias=True)


def test_distill_from_a_pretrained_timm_teacher(tmp_path: Path) -> None:
    network = write_pretrained_folder(tmp_path / "pretrained")
    summaries = {}
    for resize in ("auto", "off"):
        result = run_cli("distill", "--teacher", f"timm:local-dir:{tmp_path / 'pretrained'}", "--epochs", 1, "--out", tmp_path / resize,
                         "--set", f"train.teacher_resize={resize}", "--json", *TINY)
        assert result.exit_code == 0, result
        summaries[resize] = json.loads(result.stdout)
    bundle = load_data(load_resolved_config(tmp_path / "auto" / "config.json").data)
    views = {"own": (OWN, bicubic_160), "own, 16 px": (OWN, None), "data set": ((bundle.mean, bundle.std), bicubic_160)}
    nll = {  # an untrained network: its NLL, not its accuracy, tells the views apart
        name: classification_report(
            predict(network, bundle.test, mean=mean, std=std, device=torch.device("cpu"), batch_size=256, transform=transform), bundle.test.targets
        )["nll"]
        for name, ((mean, std), transform) in views.items()
    }
    assert summaries["auto"]["teacher_test"]["nll"] == pytest.approx(nll["own"], rel=1e-5)
    assert summaries["off"]["teacher_test"]["nll"] == pytest.approx(nll["own, 16 px"], rel=1e-5)
    assert nll["own"] != pytest.approx(nll["data set"], rel=1e-3) and nll["own"] != pytest.approx(nll["own, 16 px"], rel=1e-4)
    kd = [summary["final_epoch"]["loss"]["kd"] for summary in summaries.values()]
    assert kd[0] != kd[1]  # training, not only the test report, feeds the teacher the resized crop
    assert summaries["auto"]["teacher_arch"] == "test_resnet"


def test_the_teacher_resize_follows_the_pretrained_config(tmp_path: Path) -> None:
    network = write_pretrained_folder(tmp_path / "pretrained")
    teacher, info = pretrained_timm_model(f"local-dir:{tmp_path / 'pretrained'}")
    resize = pretrained_resize(teacher, info, (3, 16, 16))
    assert resize == Resize((160, 160), "bicubic") and pretrained_resize(teacher, info, (3, 160, 160)) is None
    pixels = torch.randint(256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    source = FrozenTeacher(network, Renormalization(data, OWN), resize)
    logits = source.logits(Batch(normalize(pixels, *data), torch.zeros(2, dtype=torch.int64), torch.arange(2)))
    with torch.no_grad():
        expected = network(bicubic_160(normalize(pixels, *OWN), torch.arange(2)))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert source.feature_shapes((3, 16, 16)) == feature_shapes(network, (3, 160, 160))  # connectors fit what the teacher sees


def test_a_missing_pretrained_teacher_is_one_line(tmp_path: Path) -> None:
    result = run_cli("distill", "--teacher", f"timm:local-dir:{tmp_path / 'nowhere'}", "--out", tmp_path / "s", *TINY)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "cannot load the pretrained timm teacher" in result.stderr
    assert not (tmp_path / "s").exists()
    cached = run_cli("distill", "--teacher", "timm:test_resnet", "--cache-teacher", "--out", tmp_path / "c", *TINY)
    assert cached.exit_code == 2 and "drop --cache-teacher" in cached.stderr
