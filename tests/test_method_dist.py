"""dist (Huang et al. 2022): the loss against a reference written from the paper and hunto/DIST_KD, a real epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from kdcli.method import Batch
from kdcli_plugins.dist import DIST, relation_losses
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch, listed_defaults


def reference_pearson(x: Tensor, y: Tensor) -> Tensor:
    """Official: cosine of the centred vectors, 1e-8 added to the product of the norms; one pair at a time."""
    x, y = x - x.sum() / len(x), y - y.sum() / len(y)
    return torch.dot(x, y) / (torch.sqrt(torch.dot(x, x)) * torch.sqrt(torch.dot(y, y)) + 1e-8)


def reference_dist(student: Tensor, teacher: Tensor, tau: float, beta: float, gamma: float) -> Tensor:
    y_s, y_t = torch.softmax(student / tau, dim=1), torch.softmax(teacher / tau, dim=1)
    inter = 1 - torch.stack([reference_pearson(y_s[i], y_t[i]) for i in range(len(y_s))]).mean()
    intra = 1 - torch.stack([reference_pearson(y_s[:, c], y_t[:, c]) for c in range(y_s.shape[1])]).mean()
    return tau**2 * (beta * inter + gamma * intra)


def random_logits(batch: int = 8, classes: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=generator) * 3, torch.randn(batch, classes, generator=generator) * 3


@pytest.mark.parametrize(("tau", "beta", "gamma"), [(4.0, 2.0, 2.0), (1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_loss_and_gradient_match_the_reference(tau: float, beta: float, gamma: float) -> None:
    def plugin(student: Tensor, teacher: Tensor) -> Tensor:
        inter, intra = relation_losses(student, teacher, tau)
        return beta * inter + gamma * intra

    student, teacher = random_logits()
    assert_same_loss_and_gradient(plugin, lambda s, t: reference_dist(s, t, tau, beta, gamma), student, teacher)


def test_identical_logits_cost_nothing_and_the_relations_ignore_per_sample_logit_shifts() -> None:
    student, teacher = random_logits()
    inter, intra = relation_losses(teacher.double(), teacher.double(), 4.0)
    assert 0 <= inter < 1e-4 and 0 <= intra < 1e-4  # not exactly 0: the official 1e-8 in the denominator
    assert relation_losses(student, teacher, 4.0)[0] > 0.1
    shifted, _ = relation_losses(teacher.double() + torch.randn(8, 1).double() * 5, teacher.double(), 4.0)
    torch.testing.assert_close(shifted, inter)  # softmax ignores a per-sample shift of the logits


def test_the_step_weights_ce_and_both_relations_on_the_networks_logits() -> None:
    method = build(DIST)
    inputs, targets = torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))
    output = method.training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(output.losses) == {"ce", "inter", "intra"}
    with torch.no_grad():
        method.student.train()
        student, teacher = method.student(inputs), method.teacher.network(inputs)
    expected = reference_dist(student.double(), teacher.double(), 4.0, 2.0, 2.0)
    assert (output.losses["inter"] + output.losses["intra"]).item() == pytest.approx(expected.item(), rel=1e-5)
    assert output.losses["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(student, targets).item(), rel=1e-5)


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "dist", "--set", "method.beta=1.5")
    assert set(record["loss"]) == {"ce", "inter", "intra", "total"}


def test_listed_with_the_official_benchmark_defaults() -> None:
    assert listed_defaults("dist") == {"beta": 2.0, "gamma": 2.0, "temperature": 4.0, "ce_weight": 1.0}
