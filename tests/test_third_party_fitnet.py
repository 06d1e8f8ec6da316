"""A third-party feature-based method written only from docs/plugins.md, trained through the real CLI.

``FitNet`` (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets") below is
what a plugin author writes from the documentation alone: a 1x1-conv
connector maps a student stage feature to the teacher's channels at a stage
of the teacher, an MSE hint to the teacher's feature, plus cross-entropy. It
is installed the way pip would leave it (a ``*.dist-info`` folder with an
``entry_points.txt`` on ``sys.path``) and trained by ``kdcli distill --method
fitnet`` against a wider teacher, so the connector really maps channels.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import safetensors.torch
import torch

from conftest import run_cli
from kdcli import registry
from kdcli.checkpoint import load_state
from kdcli.models import create_model

PLUGIN = '''
"""kdcli-fitnet: FitNets hints (Romero et al., 2015) as a kdcli method plugin."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat
from torch import nn

from kdcli.method import Batch, Method, MethodParams, StepOutput, feature_shapes


class FitNetParams(MethodParams):
    student_stage: int = Field(2, description="Student stage index whose feature is regressed.")
    teacher_stage: int = Field(2, description="Teacher stage index whose feature is the hint.")
    hint_weight: NonNegativeFloat = Field(1.0, description="Weight of the mean squared hint error.")


class FitNet(Method):
    """CE plus a 1x1-conv regression of a student stage feature onto the teacher's."""

    api_version = "3.0"
    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "FitNets: CE plus MSE between a 1x1-conv-mapped student stage feature and the teacher's."
    Params = FitNetParams
    params: FitNetParams

    def __init__(self, params, *, student, teacher, context) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        student_channels = feature_shapes(student, context.input_size)[params.student_stage][0]
        teacher_channels = teacher.feature_shapes(context.input_size)[params.teacher_stage][0]
        self.connector = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"connector": self.connector}

    def training_step(self, batch: Batch) -> StepOutput:
        logits, (feature,) = self.student_logits_and_features(batch.inputs, [self.params.student_stage])
        (hint,) = self.teacher_features(batch.inputs, [self.params.teacher_stage])
        losses = {
            "ce": F.cross_entropy(logits, batch.targets),
            "hint": self.params.hint_weight * F.mse_loss(self.connector(feature).float(), hint.float()),
        }
        return StepOutput(logits, losses)
'''

# Small enough for a few seconds on 2 shared cores; the teacher is wider than the student at stage 2.
TINY = ["--set", "data.synthetic.num_train=200", "--set", "data.synthetic.num_test=100", "--batch-size", "32", "-q"]
STUDENT, TEACHER = "cifar_resnet8", "cifar_wrn_16_2"  # stage 2: 32 vs 64 channels, both 8x8


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fitnet") / "teacher"
    result = run_cli("teach", "--model", TEACHER, "--epochs", 1, "--out", out, *TINY)
    assert result.exit_code == 0, result
    return out / "last.safetensors"


@pytest.fixture
def fitnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``kdcli-fitnet`` 0.1.0, installed into a sys.path entry of its own."""
    site = tmp_path / "site"
    dist_info = site / "kdcli_fitnet-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdcli-fitnet\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[kdcli.methods]\nfitnet = kdcli_fitnet:FitNet\n")
    (site / "kdcli_fitnet.py").write_text(PLUGIN)
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(site))
        registry.clear_caches()
        yield importlib.import_module("kdcli_fitnet")
    sys.modules.pop("kdcli_fitnet", None)
    registry.clear_caches()  # sys.path is restored: forget the temporary plugin


def test_plugin_uses_only_the_documented_api_and_stays_small() -> None:
    tree = ast.parse(PLUGIN)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"__future__", "kdcli.method", "kdcli.losses", "torch", "torch.nn.functional", "pydantic"}
    (method,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FitNet"]
    assert method.end_lineno - method.lineno + 1 <= 40


def test_fitnet_trains_through_the_cli(fitnet: ModuleType, wide_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[object, dict[str, torch.Tensor]]] = []  # (method, its connector's initial weights)
    construct = fitnet.FitNet.__init__

    def recording_init(self, *args, **kwargs) -> None:
        construct(self, *args, **kwargs)
        initial = {name: value.detach().clone() for name, value in self.trainable_modules()["connector"].state_dict().items()}
        built.append((self, initial))

    monkeypatch.setattr(fitnet.FitNet, "__init__", recording_init)
    listed = {row["name"]: row for row in run_cli("methods", "list", "--json").json()}
    assert (listed["fitnet"]["distribution"], listed["fitnet"]["error"]) == ("kdcli-fitnet", None)

    out = tmp_path / "student"
    result = run_cli(
        "distill", "--method", "fitnet", "--teacher", wide_teacher, "--model", STUDENT, "--epochs", 2,
        "--set", "method.hint_weight=0.5", "--out", out, "--json", *TINY,
    )
    assert result.exit_code == 0, result
    assert result.json()["method"] == "fitnet"
    resolved = json.loads((out / "config.json").read_text())["method"]
    assert resolved == {"name": "fitnet", "student_stage": 2, "teacher_stage": 2, "hint_weight": 0.5}

    [(method, initial)] = built
    connector = method.trainable_modules()["connector"]
    assert (connector.in_channels, connector.out_channels, connector.kernel_size) == (32, 64, (1, 1))
    trained = connector.weight.detach().cpu()
    assert trained.shape == initial["weight"].shape and (trained - initial["weight"]).abs().max().item() > 1e-6, (
        "the connector was never optimized"
    )

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert set(record["loss"]) == {"ce", "hint", "total"}
        assert all(math.isfinite(value) for value in record["loss"].values())
        assert record["loss"]["hint"] > 0
        assert record["loss"]["total"] == pytest.approx(record["loss"]["ce"] + record["loss"]["hint"], rel=1e-5)

    # The connector trains and resumes with the run, but the deployable checkpoint is the student alone.
    saved = load_state(out / "resume.safetensors")["method"]  # the method module's state_dict(): no hand code
    assert saved.keys() == {"connector.weight", "connector.bias"}
    assert torch.equal(saved["connector.weight"], connector.weight.detach().cpu())
    deployed = safetensors.torch.load_file(out / "last.safetensors")
    registry.load_model_plugins()  # the cifar_* zoo
    student_keys = create_model(STUDENT, num_classes=10, input_size=(3, 16, 16)).state_dict().keys()
    assert deployed.keys() == student_keys
    assert not any("connector" in key or "extras" in key for key in deployed)


def test_teacher_cache_refuses_feature_access_in_one_line(fitnet: ModuleType, wide_teacher: Path, tmp_path: Path) -> None:
    result = run_cli(
        "distill", "--method", "fitnet", "--teacher", wide_teacher, "--model", STUDENT, "--epochs", 1,
        "--cache-teacher", "--out", tmp_path / "cached", *TINY,
    )
    assert result.exit_code == 1, result
    # A weak-teacher ``warning:`` note may come first; the failure itself is one line, before any training.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: the method reads the teacher's features"), result
    assert "train.cache_teacher" in lines[0] and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "cached" / "metrics.jsonl").exists()
