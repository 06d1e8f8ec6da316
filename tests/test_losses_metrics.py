"""Loss and metric functions against by-hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.losses import distillation_kl, soft_cross_entropy
from kdcli.metrics import brier_score, classification_report, distance_to_true_distribution, expected_calibration_error, topk_accuracy
from kdcli_plugins.kd import HintonKD, KDParams
from kdcli.method import Batch, FrozenTeacher, MethodContext


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / tau) for v in s_row]
        t_exp = [math.exp(v / tau) for v in t_row]
        q = [v / sum(s_exp) for v in s_exp]
        p = [v / sum(t_exp) for v in t_exp]
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    return total


def test_distillation_kl_matches_hand_computation_for_both_reductions() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    tau = 4.0
    summed = kl_by_hand(student, teacher, tau)
    assert distillation_kl(student, teacher, tau).item() == pytest.approx(tau**2 * summed / 5, rel=1e-5)
    assert distillation_kl(student, teacher, tau, "mean").item() == pytest.approx(tau**2 * summed / (5 * 7), rel=1e-5)


def test_soft_cross_entropy_equals_hard_cross_entropy_on_one_hot() -> None:
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert soft_cross_entropy(logits, torch.nn.functional.one_hot(targets, 4).float()).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kd_method_step_combines_weighted_terms() -> None:
    student, teacher = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4).eval()
    context = MethodContext(num_classes=4, num_train=8, epochs=1, steps_per_epoch=1, device=torch.device("cpu"), mean=(0.0,), std=(1.0,))
    method = HintonKD(KDParams(temperature=2.0, ce_weight=0.5, kd_weight=0.5), student=student, teacher=FrozenTeacher(teacher), context=context)
    batch = Batch(torch.randn(8, 3), torch.randint(0, 4, (8,)), torch.arange(8))
    output = method.training_step(batch)
    with torch.no_grad():
        z_s, z_t = student(batch.inputs), teacher(batch.inputs)
    ce = torch.nn.functional.cross_entropy(z_s, batch.targets).item()
    kd = 4.0 * kl_by_hand(z_s, z_t, 2.0) / 8
    assert output.losses["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert output.losses["kd"].item() == pytest.approx(0.5 * kd, rel=1e-5)
    output.losses["kd"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained


def test_accuracy_brier_and_ece_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    targets = torch.tensor([0, 1, 1, 1])
    logits = probs.log()
    assert topk_accuracy(logits, targets, 1) == 0.75
    assert topk_accuracy(logits, targets, 5) == 1.0
    # Brier: (0.01+0.01) + (0.36+0.36) + (0.09+0.09) + (0.04+0.04), averaged over 4.
    assert brier_score(probs, targets) == pytest.approx(1.0 / 4)
    # 15 bins: 0.9 -> bin 13 (acc 1), 0.6 -> bin 8 (acc 0), 0.7 -> bin 10 (acc 1), 0.8 -> bin 11 (acc 1).
    expected = (abs(0.9 - 1) + abs(0.6 - 0) + abs(0.7 - 1) + abs(0.8 - 1)) / 4
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    report = classification_report(logits, targets)
    assert report["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4, rel=1e-5)


def test_distance_to_true_distribution() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p_star = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    distance = distance_to_true_distribution(probs, p_star)
    assert distance["tv"] == pytest.approx(0.25) and distance["sq_l2"] == pytest.approx(0.25)
