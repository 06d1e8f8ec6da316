"""dkd, built in (mdistiller DKD.py): the loss against the official formulation, the warm-up, a real epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import run_cli
from kdcli.losses import distillation_kl
from kdcli.method import Batch
from kdcli_plugins.dkd import DKD, decoupled_kd_terms
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch


def reference_dkd(student: Tensor, teacher: Tensor, targets: Tensor, alpha: float, beta: float, tau: float) -> Tensor:
    """mdistiller's formulation: binary probabilities by masked sums, log of them; NCKD by lowering the target logit 1000."""
    target = F.one_hot(targets, student.shape[1]).to(student.dtype)
    p_s, p_t = torch.softmax(student / tau, dim=1), torch.softmax(teacher / tau, dim=1)
    b_s = torch.stack([(p_s * target).sum(1), (p_s * (1 - target)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * target).sum(1), (p_t * (1 - target)).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum() * tau**2 / len(targets)
    q_t = torch.softmax(teacher / tau - 1000 * target, dim=1)
    log_q_s = torch.log_softmax(student / tau - 1000 * target, dim=1)
    nckd = torch.where(q_t > 0, q_t * (torch.log(q_t) - log_q_s), torch.zeros(())).sum() * tau**2 / len(targets)
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize(("alpha", "beta", "tau"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0)])
def test_loss_and_gradient_match_the_official_formulation(alpha: float, beta: float, tau: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator) * 3, torch.randn(8, 10, generator=generator) * 3
    targets = torch.randint(0, 10, (8,), generator=generator)

    def plugin(s: Tensor, t: Tensor) -> Tensor:
        tckd, nckd = decoupled_kd_terms(s, t, targets, tau)
        return alpha * tckd + beta * nckd

    assert_same_loss_and_gradient(plugin, lambda s, t: reference_dkd(s, t, targets, alpha, beta, tau), student, teacher)


def test_kd_is_tckd_plus_the_teachers_non_target_mass_times_nckd() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 10, generator=generator).double(), torch.randn(1, 10, generator=generator).double()
    target = torch.tensor([3])
    tckd, nckd = decoupled_kd_terms(student, teacher, target, 4.0)
    teacher_target = torch.softmax(teacher / 4, dim=1)[0, 3]
    # Zhao et al., eq. (5); distillation_kl computes in float32
    torch.testing.assert_close(distillation_kl(student, teacher, 4.0).double(), tckd + (1 - teacher_target) * nckd, rtol=1e-5, atol=0)


def test_the_step_warms_the_kd_terms_up() -> None:
    method = build(DKD, warmup_epochs=4)
    batch = Batch(torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,)), torch.arange(8))
    terms = []
    for epoch in (1, 2, 9):
        method.on_epoch_start(epoch)
        output = method.training_step(batch)
        terms.append((output.losses["tckd"].item(), output.losses["nckd"].item()))
        assert method.on_epoch_end(epoch) == {"kd_weight": min(epoch / 4, 1.0)}
    for (tckd, nckd), weight in zip(terms, (0.25, 0.5, 1.0)):
        assert tckd == pytest.approx(weight * terms[-1][0], rel=1e-5) and nckd == pytest.approx(weight * terms[-1][1], rel=1e-5)


def test_built_in_beside_the_example_package() -> None:
    listing = {row["name"]: row for row in run_cli("methods", "list", "--json").json()}
    assert listing["dkd"]["distribution"] == "kdcli" and listing["dkd"]["error"] is None
    params = {row["name"]: row["default"] for row in run_cli("methods", "show", "dkd", "--json").json()["params"]}
    assert params == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup_epochs": 20}


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "dkd", "--set", "method.warmup_epochs=2")
    assert set(record["loss"]) == {"ce", "tckd", "nckd", "total"} and record["method"]["kd_weight"] == 0.5
    assert json.loads((tmp_path / "dkd" / "config.json").read_text())["method"]["name"] == "dkd"
