"""rkd (RepDistiller RKD.py): the loss against a reference, the pooled features it reads, a real epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from kdcli.method import Batch
from kdcli_plugins.rkd import RKD, rkd_terms
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch, listed_defaults, step_under_bf16_autocast


def huber(a: Tensor, b: Tensor) -> Tensor:
    """Smooth L1 with threshold 1, averaged over all entries."""
    x = (a - b).abs()
    return torch.where(x < 1, 0.5 * x * x, x - 0.5).sum() / x.numel()


def reference_distances(x: Tensor) -> Tensor:
    """Official: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12)) off the diagonal, 0 on it; divided by the mean positive one."""
    n = len(x)
    d = torch.stack([
        torch.stack([torch.zeros((), dtype=x.dtype) if i == j else torch.sqrt(torch.clamp(x[i] @ x[i] + x[j] @ x[j] - 2 * x[i] @ x[j], min=1e-12))
                     for j in range(n)])
        for i in range(n)
    ])
    return d / d[d > 0].mean()


def reference_angles(x: Tensor) -> Tensor:
    """Official: for each apex a, the cosines between the unit vectors x_b - x_a and x_c - x_a (zero vectors stay 0)."""
    n = len(x)
    unit = [[(x[b] - x[a]) / torch.clamp(torch.linalg.vector_norm(x[b] - x[a]), min=1e-12) for b in range(n)] for a in range(n)]
    return torch.stack([unit[a][b] @ unit[a][c] for a in range(n) for b in range(n) for c in range(n)])


def reference_rkd(student: Tensor, teacher: Tensor, w_d: float = 25.0, w_a: float = 50.0) -> Tensor:
    teacher = teacher.detach()
    distance = huber(reference_distances(student), reference_distances(teacher))
    angle = huber(reference_angles(student), reference_angles(teacher))
    return w_d * distance + w_a * angle


@pytest.mark.parametrize(("student_dim", "teacher_dim", "scale"), [(16, 16, 1.0), (16, 64, 1.0), (8, 32, 10.0)])
def test_loss_and_gradient_match_the_reference(student_dim: int, teacher_dim: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, student_dim, generator=generator) * scale  # scale 10: distances beyond Huber's threshold
    teacher = torch.randn(6, teacher_dim, generator=generator)

    def plugin(s: Tensor, t: Tensor) -> Tensor:
        distance, angle = rkd_terms(s, t)
        return 25 * distance + 50 * angle

    assert_same_loss_and_gradient(plugin, reference_rkd, student, teacher)


def test_the_step_weights_distance_and_angle_on_the_pooled_features() -> None:
    method = build(RKD, feature_weight=2.0)
    inputs, targets = torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))
    output = method.training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(output.losses) == {"ce", "distance", "angle"}
    with torch.no_grad():
        student = method.student.forward_head(method.student.forward_features(inputs), pre_logits=True).double()
        teacher = method.teacher.network.forward_head(method.teacher.network.forward_features(inputs), pre_logits=True).double()
    assert output.losses["distance"].item() == pytest.approx(2 * 25 * reference_rkd(student, teacher, 1, 0).item(), rel=1e-5)
    assert output.losses["angle"].item() == pytest.approx(2 * 50 * reference_rkd(student, teacher, 0, 1).item(), rel=1e-5)


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "rkd")
    assert set(record["loss"]) == {"ce", "distance", "angle", "total"}


def test_listed_with_the_official_benchmark_defaults() -> None:
    assert listed_defaults("rkd") == {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "student_module": "global_pool", "teacher_module": None, "feature_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}


def test_one_epoch_of_a_timm_student(teacher_run: Path, tmp_path: Path) -> None:
    """timm's EfficientNet (five stages after the stem, its own global_pool) against the CIFAR-zoo teacher."""
    record = distill_one_epoch(teacher_run, tmp_path, "rkd", model="test_efficientnet")
    assert set(record["loss"]) == {"ce", "distance", "angle", "total"}



def test_the_feature_loss_stays_float32_under_mixed_precision() -> None:
    # Autocast would run the Gram matrix of the distances in bf16; the student's forward itself does run in bf16.
    method = build(RKD)
    seen = []
    pooled_features = method.pooled_features
    method.pooled_features = lambda inputs: seen.append(pooled_features(inputs)) or seen[-1]
    losses = step_under_bf16_autocast(method)
    _, _, student, teacher = seen[0]
    distance, angle = rkd_terms(student.detach(), teacher)
    torch.testing.assert_close(losses["distance"].detach(), 25 * distance, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["angle"].detach(), 50 * angle, rtol=1e-6, atol=0)
