"""kdcli export writes the Hub layout timm loads; students record their teacher's lineage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli
from kdcli.checkpoint import checkpoint_digest
from kdcli.jobs.common import model_from_checkpoint

LOAD_WITH_TIMM = """
import json, sys
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2]))
assert not any(name == "kdcli" or name.startswith("kdcli.") for name in sys.modules), "kdcli was imported"
print(json.dumps({"logits": logits.tolist(), "mean": list(model.pretrained_cfg["mean"]), "input_size": list(model.pretrained_cfg["input_size"])}))
"""


@pytest.fixture(scope="module")
def timm_student(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student with a timm architecture (resnet10t), distilled for one epoch."""
    out = tmp_path_factory.mktemp("export") / "student"
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--model", "resnet10t", "--epochs", 1, "--out", out, *TINY)
    assert result.exit_code == 0, result
    return out


def test_timm_loads_the_export_with_the_same_logits(timm_student: Path, tmp_path: Path) -> None:
    checkpoint = timm_student / "last.safetensors"
    out = tmp_path / "hub"
    result = run_cli("export", checkpoint, out, "--json")
    assert result.exit_code == 0, result
    assert result.json()["timm_native"] is True
    assert {path.name for path in out.iterdir()} == {"model.safetensors", "config.json", "README.md", ".kdcli-export.json"}
    model, info = model_from_checkpoint(checkpoint)
    inputs = torch.randn(4, *info.input_size, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model.eval()(inputs)
    # A process that never imports kdcli: only timm, as a Hub user would.
    probe = subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM, str(out), str(tmp_path / "inputs.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert probe.returncode == 0, probe.stderr
    loaded = json.loads(probe.stdout)
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)
    assert loaded["mean"] == pytest.approx(list(info.mean)) and loaded["input_size"] == list(info.input_size)


def test_model_card_names_metrics_method_teacher_and_data(timm_student: Path, teacher_run: Path, tmp_path: Path) -> None:
    assert run_cli("export", timm_student / "last.safetensors", tmp_path / "hub").exit_code == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    summary = json.loads((timm_student / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: timm\n")
    assert f"| test top1 | {summary['test']['top1']:.4f} |" in card
    assert "`temperature`: `4.0`" in card and "kd" in card
    assert "`cifar_resnet14`" in card and checkpoint_digest(teacher_run / "last.safetensors") in card
    assert "`synthetic`" in card


def test_a_kdcli_architecture_exports_with_a_note(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli("export", teacher_run / "last.safetensors", tmp_path / "hub")
    assert result.exit_code == 0, result
    assert "import kdcli.models" in result.stdout
    assert "import kdcli.models" in (tmp_path / "hub" / "README.md").read_text()


def run_fresh(script: str, inputs: Path) -> torch.Tensor:
    """``script`` (which leaves a timm ``model``) in a new interpreter: the model's logits on ``inputs``."""
    probe = script + "\nimport sys, torch\nwith torch.no_grad():\n    print(model.eval()(torch.load(sys.argv[1])).tolist())\n"
    result = subprocess.run([sys.executable, "-c", probe, str(inputs)], capture_output=True, text=True, cwd=inputs.parent, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.tensor(json.loads(result.stdout))


def test_the_printed_load_hint_and_the_card_snippet_run_as_pasted(teacher_run: Path, tmp_path: Path) -> None:
    """A kdcli architecture: ``import kdcli.models`` must register the zoo, in a process that has done nothing else."""
    out = tmp_path / "hub"
    result = run_cli("export", teacher_run / "last.safetensors", out)
    assert result.exit_code == 0, result
    hint = re.search(r"load: (timm\.create_model\(.*?\)) after `(import kdcli\.models)`", result.stdout)
    assert hint is not None, result.stdout
    (snippet,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.DOTALL)
    assert 'create_model("hf-hub:REPO_ID"' in snippet and '"local-dir:PATH"' in snippet
    model, info = model_from_checkpoint(teacher_run / "last.safetensors")
    inputs = torch.randn(2, *info.input_size, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model.eval()(inputs)
    pasted_hint = f"import timm\n{hint.group(2)}\nmodel = {hint.group(1)}"
    pasted_card = snippet.replace("hf-hub:REPO_ID", f"local-dir:{out}")  # the card's own alternative to the Hub id
    for script in (pasted_hint, pasted_card):
        torch.testing.assert_close(run_fresh(script, tmp_path / "inputs.pt"), expected, rtol=1e-4, atol=1e-5)


def test_lineage_is_recorded_and_shown(timm_student: Path, teacher_run: Path) -> None:
    report = run_cli("eval", timm_student / "last.safetensors", "--json").json()
    (teacher,) = report["lineage"]
    assert teacher["arch"] == "cifar_resnet14" and teacher["method"] == "standard"
    assert teacher["sha256"] == checkpoint_digest(teacher_run / "last.safetensors")
    assert 0.0 <= teacher["clean_top1"] <= 1.0 and teacher["clean_split"] == "val"
    table = run_cli("eval", timm_student / "last.safetensors")
    assert "lineage: resnet10t <- cifar_resnet14 (standard, epoch 3" in table.stdout


def test_refusals_come_before_any_file(timm_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = run_cli("export", timm_student / "last.safetensors", busy)
    assert result.exit_code == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    result = run_cli("export", timm_student / "last.safetensors", tmp_path / "new", "--push", "someone/model")
    assert result.exit_code == 1 and result.stderr.startswith("kdcli: error: pushing to the Hugging Face Hub needs a login")
    assert not (tmp_path / "new").exists()
    result = run_cli("export", tmp_path / "missing.safetensors", tmp_path / "other")
    assert result.exit_code == 1 and result.stderr.startswith("kdcli: error:") and not (tmp_path / "other").exists()


# -- ONNX -------------------------------------------------------------------------------------

RUN_WITH_ONNXRUNTIME = """
import json, sys
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inputs = np.load(sys.argv[2])
logits = session.run(["logits"], {"input": inputs})[0]
assert not any(name == "kdcli" or name.startswith("kdcli.") or name == "torch" for name in sys.modules), "kdcli or torch was imported"
meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
print(json.dumps({"logits": logits.tolist(), "meta": meta, "batch": session.get_inputs()[0].shape[0]}))
"""


@pytest.mark.parametrize("architecture", ["timm resnet10t", "cifar zoo"])
def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(architecture: str, timm_student: Path, teacher_run: Path, tmp_path: Path) -> None:
    """``--format onnx``: a process with onnxruntime and numpy alone gets PyTorch's logits for any batch size."""
    checkpoint = (timm_student if architecture.startswith("timm") else teacher_run) / "last.safetensors"
    out = tmp_path / "deploy"
    result = run_cli("export", checkpoint, out, "--format", "onnx", "--json")
    assert result.exit_code == 0, result
    assert result.json()["files"] == [str(out / "model.onnx")]
    assert {path.name for path in out.iterdir()} == {"model.onnx", ".kdcli-export.json"}
    model, info = model_from_checkpoint(checkpoint)
    inputs = torch.randn(5, *info.input_size, generator=torch.Generator().manual_seed(0))  # 5: not the traced batch of 2
    np_path = tmp_path / "inputs.npy"
    __import__("numpy").save(np_path, inputs.numpy())
    with torch.no_grad():
        expected = model.eval()(inputs)
    probe = subprocess.run([sys.executable, "-c", RUN_WITH_ONNXRUNTIME, str(out / "model.onnx"), str(np_path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert probe.returncode == 0, probe.stderr
    loaded = json.loads(probe.stdout)
    assert (torch.tensor(loaded["logits"]) - expected).abs().max().item() <= 1e-4
    assert not isinstance(loaded["batch"], int)  # a named, dynamic batch dimension
    meta = loaded["meta"]
    assert meta["mean"] == pytest.approx(list(info.mean)) and meta["std"] == pytest.approx(list(info.std))
    assert meta["input_size"] == list(info.input_size) and meta["architecture"] == info.arch
    assert meta["class_names"] == [str(index) for index in range(info.num_classes)]  # the synthetic set has no folder names


def test_onnx_beside_a_timm_export_keeps_both_replaceable(teacher_run: Path, tmp_path: Path) -> None:
    checkpoint, out = teacher_run / "last.safetensors", tmp_path / "both"
    assert run_cli("export", checkpoint, out).exit_code == 0
    assert run_cli("export", checkpoint, out, "--format", "onnx", "--overwrite").exit_code == 0
    recorded = json.loads((out / ".kdcli-export.json").read_text())["files"]
    assert set(recorded) == {"model.safetensors", "config.json", "README.md", "model.onnx"}
    assert run_cli("export", checkpoint, out, "--overwrite").exit_code == 0  # the timm files are still kdcli's


def test_an_unknown_export_format_is_one_line_before_any_file(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli("export", teacher_run / "last.safetensors", tmp_path / "x", "--format", "tflite")
    assert result.exit_code != 0 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("kdcli: error: --format takes timm or onnx")
    assert not (tmp_path / "x").exists()
