"""SoTeacher against by-hand computations and the official update sequence; resume keeps the bank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from conftest import TINY, run_cli
from kdcli.checkpoint import load_state
from kdcli.config import build_config
from kdcli.jobs.build import resolve_run
from kdcli.method import Batch, MethodContext, MethodError
from kdcli_plugins.soteacher import LipschitzLayers, SoTeacher, SoTeacherParams, consistency_weight
from test_resume import interrupt_at


class SmallNet(nn.Module):
    """conv -> bn -> linear with hand-picked weights, and timm's get_classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(2, eps=1.0)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)  # l1: 18 entries * 0.5 = 9
            self.bn.weight.copy_(torch.tensor([2.0, -3.0]))
            self.bn.running_var.copy_(torch.tensor([3.0, 0.0]))  # |gamma| / sqrt(var + 1) = 1, 3 -> 3
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, -1.0]]))  # column sums 4, 7 -> 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc


class Scale(nn.Module):
    """Logits = inputs * s: lets a test choose the predictions exactly (no layer R_Lip counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_method(student: nn.Module, *, num_train: int = 8, num_classes: int = 3, epochs: int = 3, all_gather=None, **params) -> SoTeacher:
    extra = {} if all_gather is None else {"all_gather": all_gather}
    context = MethodContext(
        num_classes=num_classes, num_train=num_train, epochs=epochs, steps_per_epoch=2,
        device=torch.device("cpu"), mean=(0.0,), std=(1.0,), **extra,
    )
    return SoTeacher(SoTeacherParams(**params), student=student, teacher=None, context=context)


def test_lipschitz_bound_equals_hand_computation() -> None:
    assert LipschitzLayers.of(SmallNet(), include_head=True).bound().item() == pytest.approx(9 + 3 + 7)
    assert LipschitzLayers.of(SmallNet(), include_head=False).bound().item() == pytest.approx(9 + 3)


def test_batch_norm_without_affine_scale_counts_as_gamma_one() -> None:
    norm = nn.BatchNorm1d(2, affine=False, eps=0.0)
    norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    assert LipschitzLayers.of(norm, include_head=True).bound().item() == pytest.approx(2.0)
    assert LipschitzLayers.of(nn.BatchNorm1d(2, track_running_stats=False), include_head=True).batch_norms == ()


def test_lipschitz_gradient_reaches_batch_norm_scale_not_running_statistics() -> None:
    net = SmallNet()
    LipschitzLayers.of(net, include_head=True).bound().backward()
    # Only the channel attaining the max gets gradient: d/dgamma_1 |gamma_1| / sqrt(0 + 1) = sign(-3).
    assert torch.equal(net.bn.weight.grad, torch.tensor([0.0, -1.0]))
    assert net.bn.running_var.grad is None and net.bn.running_mean.grad is None
    assert not net.bn.running_var.requires_grad
    assert torch.equal(net.conv.weight.grad, torch.full_like(net.conv.weight, 1.0))
    assert torch.equal(net.fc.weight.grad, torch.tensor([[0.0, -1.0], [0.0, 1.0], [0.0, -1.0]]))


def test_lipschitz_layers_found_by_type_in_a_timm_model() -> None:
    # timm's BatchNormAct2d subclasses BatchNorm2d but has children: a leaf-only walk would miss it.
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    layers = LipschitzLayers.of(model, include_head=False)
    named_norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert any(type(m).__name__ == "BatchNormAct2d" for m in named_norms)
    assert len(layers.batch_norms) == len(named_norms)
    assert model.get_classifier() not in layers.linears
    assert len(LipschitzLayers.of(model, include_head=True).linears) == len(layers.linears) + 1
    assert math.isfinite(layers.bound().item())


def test_excluding_the_head_needs_get_classifier() -> None:
    with pytest.raises(MethodError, match="get_classifier"):
        make_method(nn.Sequential(nn.Linear(3, 3)), lipschitz_include_head=False)


def test_bank_follows_the_official_cumulative_mean_over_three_epochs() -> None:
    torch.manual_seed(0)
    num_train, num_classes = 8, 3
    method = make_method(Scale(), num_train=num_train, num_classes=num_classes, consistency_weight=2.0, lipschitz_weight=0.0)
    logits = [torch.randn(num_train, num_classes) for _ in range(3)]
    probs = [z.softmax(dim=1) for z in logits]
    # The official sequence: epoch 1 counts twice, then a plain running mean.
    expected_banks = [probs[0], (2 * probs[0] + probs[1]) / 3, (2 * probs[0] + probs[1] + probs[2]) / 4]
    targets = torch.randint(0, num_classes, (num_train,))
    for epoch in (1, 2, 3):
        method.on_epoch_start(epoch)
        bank_before = method.bank.clone()
        order = torch.randperm(num_train)
        for index in order.split(4):
            batch = Batch(logits[epoch - 1][index], targets[index], index)
            output = method.training_step(batch)
            method.after_step(batch, output)  # the engine's order: the bank takes this step's predictions after its loss
            expected_mse = (probs[epoch - 1][index] - bank_before[index]).pow(2).sum(dim=1).mean()
            if epoch == 1:
                assert output.losses["consistency"].item() == 0.0 and output.logs["consistency_mse"].item() == 0.0
            else:
                assert output.logs["consistency_mse"].item() == pytest.approx(expected_mse.item(), rel=1e-5)
                weight = 2.0 * epoch / 3
                assert output.losses["consistency"].item() == pytest.approx(weight * expected_mse.item(), rel=1e-5)
                assert output.losses["consistency"].requires_grad
        assert method.on_epoch_end(epoch)["consistency_weight"] == pytest.approx(2.0 * epoch / 3)
        torch.testing.assert_close(method.bank, expected_banks[epoch - 1])


def test_bank_update_uses_predictions_gathered_from_every_rank() -> None:
    # A fake second rank that saw samples 4..7 and predicted a fixed distribution for them.
    other = torch.tensor([[0.7, 0.2, 0.1]]).expand(4, 3)

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor + 4 if tensor.dtype == torch.int64 else other])

    method = make_method(Scale(), all_gather=all_gather)
    method.on_epoch_start(1)
    inputs = torch.randn(4, 3)
    batch = Batch(inputs, torch.zeros(4, dtype=torch.int64), torch.arange(4))
    method.after_step(batch, method.training_step(batch))
    torch.testing.assert_close(method.bank[:4], inputs.softmax(dim=1))
    torch.testing.assert_close(method.bank[4:], other)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [0.2 * k for k in range(1, 11)]),
        ("step", [0.0, 0.0, 0.0] + [2.0] * 7),
        ("cosine", [2.0 * math.cos((1 - k / 10) * math.pi / 2) for k in range(1, 11)]),
        ("cycle", [2.0 * math.sqrt(1 - (1 - k / 10) ** 2) for k in range(1, 11)]),
        ("constant", [2.0] * 10),
    ],
)
def test_consistency_schedules(schedule: str, expected: list[float]) -> None:
    values = [consistency_weight(schedule, k, 10, 2.0, 3) for k in range(1, 11)]
    assert values == pytest.approx(expected)
    assert values[-1] == pytest.approx(2.0) and values[0] <= values[-1]


def test_methods_show_lists_every_hyperparameter_with_its_default() -> None:
    shown = run_cli("methods", "show", "soteacher", "--json").json()
    assert shown["roles"] == ["teach"] and shown["teacher"] == "none"
    defaults = {row["name"]: row["default"] for row in shown["params"]}
    assert defaults == {
        "lipschitz_weight": 1e-5, "lipschitz_include_head": True, "consistency_weight": 1.0,
        "consistency_schedule": "linear", "consistency_start_at": 50,
    }


RUN = ["--method", "soteacher", "--model", "cifar_resnet8", "--epochs", 3, "--set", "train.deterministic=true", *TINY]


def test_resume_mid_run_gives_identical_bank_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("teach", "--out", straight, *RUN).exit_code == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert run_cli("teach", "--out", resumed, *RUN).exit_code == 130
    assert run_cli("teach", "--resume", resumed, "-q").exit_code == 0

    expected, actual = (safetensors.torch.load_file(run / "last.safetensors") for run in (straight, resumed))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)
    banks = [load_state(run / "resume.safetensors")["method"]["bank"] for run in (straight, resumed)]
    assert banks[0].shape == (432, 10) and banks[0].sum(dim=1).allclose(torch.ones(432))  # 480 minus the val split
    assert torch.equal(banks[0], banks[1])

    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["loss"]) == {"ce", "lipschitz", "consistency", "total"}
    assert set(records[0]["method"]) == {"lipschitz_bound", "consistency_mse", "consistency_weight"}
    assert records[0]["loss"]["consistency"] == 0.0 and records[1]["loss"]["consistency"] > 0.0
    assert [record["method"]["consistency_weight"] for record in records] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert records[0]["loss"]["lipschitz"] == pytest.approx(1e-5 * records[0]["method"]["lipschitz_bound"])


EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "cifar100").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_cifar100_example_configs_hold_the_paper_recipe(path: Path) -> None:
    flags = {"job": "distill", "teacher": "teacher.safetensors"} if path.name.startswith("student_") else {"job": "teach"}
    spec = resolve_run(build_config(file=path, flags=flags))
    config, params = spec.config, spec.params
    assert (config.data.name, config.data.val_split, config.train.epochs, config.train.batch_size) == ("cifar100", 0.0, 240, 64)
    assert (config.optim.lr, config.optim.weight_decay, config.schedule.milestones) == (0.05, 5e-4, [150, 180, 210])
    if config.method.name == "soteacher":
        assert params == SoTeacherParams()  # the paper's values are the defaults
    if config.method.name == "kd":
        assert (params.temperature, params.ce_weight, params.kd_weight) == (4.0, 0.5, 0.5)
