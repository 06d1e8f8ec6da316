"""pkt (RepDistiller PKT.py): the loss against a reference, the pooled features it reads, a real epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import TINY, run_cli
from kdcli.method import Batch
from kdcli_plugins.pkt import PKT, probability_transfer_loss
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch, listed_defaults, step_under_bf16_autocast


def reference_probabilities(features: Tensor, eps: float = 1e-7) -> Tensor:
    """Official: unit rows (eps added to the norm), cosine similarities mapped to [0, 1], rows summing to 1."""
    rows = [row / (torch.sqrt((row * row).sum()) + eps) for row in features]
    cosine = torch.stack([torch.stack([torch.dot(a, b) for b in rows]) for a in rows])
    scaled = (cosine + 1) / 2
    return scaled / scaled.sum(dim=1, keepdim=True)


def reference_pkt(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    p, q = reference_probabilities(student), reference_probabilities(teacher)
    return (q * (torch.log(q + eps) - torch.log(p + eps))).sum() / q.numel()


@pytest.mark.parametrize(("student_dim", "teacher_dim"), [(16, 16), (16, 64)])
def test_loss_and_gradient_match_the_reference(student_dim: int, teacher_dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, student_dim, generator=generator), torch.randn(8, teacher_dim, generator=generator)
    assert_same_loss_and_gradient(probability_transfer_loss, reference_pkt, student, teacher)
    post_relu = student.relu(), teacher.relu()  # the pooled features of ReLU networks are non-negative
    assert_same_loss_and_gradient(probability_transfer_loss, reference_pkt, *post_relu)


def test_the_step_reads_the_pooled_features_before_the_classifier() -> None:
    method = build(PKT, teacher="cifar_wrn_16_1")  # WRN: the pooled feature follows a final BN-ReLU, not the last stage
    inputs, targets = torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))
    output = method.training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(output.losses) == {"ce", "pkt"}
    with torch.no_grad():
        student = method.student.forward_head(method.student.forward_features(inputs), pre_logits=True)
        teacher = method.teacher.network.forward_head(method.teacher.network.forward_features(inputs), pre_logits=True)
    # The same float32 features (the loss is a small difference of logs: float32 and float64 differ in the 5th digit).
    torch.testing.assert_close(output.losses["pkt"], 30000 * probability_transfer_loss(student, teacher), rtol=1e-6, atol=0)
    assert output.losses["pkt"].item() == pytest.approx(30000 * reference_pkt(student.double(), teacher.double()).item(), rel=1e-3)


def test_a_module_the_teacher_lacks_is_refused_before_anything_is_written(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = run_cli("distill", "--method", "pkt", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8",
                     "--set", "method.teacher_module=pool", "--out", out, *TINY)
    assert result.exit_code == 2 and not out.exists(), result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kdcli: error: model") and "has no module named 'pool'" in line and "global_pool" in line


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "pkt", "--set", "method.kd_weight=0.5")
    assert set(record["loss"]) == {"ce", "kd", "pkt", "total"}


def test_listed_with_the_official_benchmark_defaults() -> None:
    assert listed_defaults("pkt") == {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "student_module": "global_pool", "teacher_module": None, "feature_weight": 30000.0}


def test_one_epoch_of_a_timm_student(teacher_run: Path, tmp_path: Path) -> None:
    """timm's EfficientNet (five stages after the stem, its own global_pool) against the CIFAR-zoo teacher."""
    record = distill_one_epoch(teacher_run, tmp_path, "pkt", model="test_efficientnet")
    assert set(record["loss"]) == {"ce", "pkt", "total"}


def test_the_feature_loss_stays_float32_under_mixed_precision() -> None:
    # Autocast would run its matmuls in bf16; the student's forward itself does run in bf16.
    losses = step_under_bf16_autocast(build(PKT))
    assert losses["pkt"].dtype == torch.float32 and torch.isfinite(losses["pkt"])
