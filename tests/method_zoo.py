"""Shared pieces of the tests of the method zoo (tests/test_method_*.py): build a method, compare a loss
with a reference implementation (value and gradient), one real ``kdcli distill`` epoch."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from conftest import TINY, run_cli
from kdcli.method import FrozenTeacher, Method, MethodContext
from kdcli.models import create_model
from kdcli.registry import load_model_plugins

INPUT_SIZE = (3, 16, 16)
NUM_CLASSES = 10

load_model_plugins()  # the cifar_* zoo


def build(method: type[Method], student: str = "cifar_resnet8", teacher: str = "cifar_resnet14", **params: object) -> Method:
    """The method on freshly initialised CIFAR-zoo networks (seeded), on the CPU."""
    torch.manual_seed(0)
    context = MethodContext(
        num_classes=NUM_CLASSES, num_train=64, epochs=1, steps_per_epoch=1, device=torch.device("cpu"),
        mean=(0.5,) * 3, std=(0.25,) * 3, input_size=INPUT_SIZE,
    )
    return method(
        method.Params.model_validate(params),
        student=create_model(student, num_classes=NUM_CLASSES, input_size=INPUT_SIZE),
        teacher=FrozenTeacher(create_model(teacher, num_classes=NUM_CLASSES, input_size=INPUT_SIZE)),
        context=context,
    )


def assert_same_loss_and_gradient(
    loss: Callable[[Tensor, Tensor], Tensor], reference: Callable[[Tensor, Tensor], Tensor], student: Tensor, teacher: Tensor
) -> None:
    """``loss`` and ``reference`` agree to 1e-6 (relative) in value and in the gradient with respect to ``student``,
    computed in float64."""
    values, gradients = [], []
    for function in (loss, reference):
        leaf = student.detach().double().requires_grad_(True)
        value = function(leaf, teacher.detach().double())
        (gradient,) = torch.autograd.grad(value, leaf)
        values.append(value.detach())
        gradients.append(gradient)
    assert values[0].shape == values[1].shape == ()
    assert values[0].abs() > 0 and gradients[1].abs().max() > 0  # a loss that is not trivially zero
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-6, atol=1e-12)


def distill_one_epoch(teacher_run: Path, tmp_path: Path, method: str, *args: object, model: str = "cifar_resnet8") -> dict:
    """One real ``kdcli distill --method METHOD`` epoch of a ``model`` student on the tiny synthetic set; its metrics record."""
    out = tmp_path / method
    result = run_cli(
        "distill", "--method", method, "--teacher", teacher_run / "last.safetensors", "--model", model,
        "--epochs", 1, "--set", "teacher_min_top1=0", "--out", out, *args, *TINY,
    )
    assert result.exit_code == 0, result
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(value) for value in record["loss"].values()), record
    return record


def listed_defaults(method: str) -> dict[str, object]:
    """``kdcli methods list`` shows the method as a usable built-in with a summary; ``methods show`` its defaults."""
    listing = {row["name"]: row for row in run_cli("methods", "list", "--json").json()}
    row = listing[method]
    assert (row["distribution"], row["error"], row["roles"], row["teacher"]) == ("kdcli", None, ["distill"], "required")
    assert row["summary"]
    return {param["name"]: param["default"] for param in run_cli("methods", "show", method, "--json").json()["params"]}


def step_under_bf16_autocast(method: Method) -> dict[str, Tensor]:
    """The step's losses when the engine runs it under mixed precision (bf16 autocast, here on the CPU)."""
    from kdcli.method import Batch

    generator = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, *INPUT_SIZE, generator=generator), torch.randint(0, NUM_CLASSES, (8,), generator=generator), torch.arange(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return method.training_step(batch).losses
