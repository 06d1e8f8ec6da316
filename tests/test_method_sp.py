"""sp (RepDistiller SP.py): the loss against a reference, the stage it reads, a real epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from kdcli.method import Batch
from kdcli_plugins.sp import SimilarityPreserving, similarity_loss
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch, listed_defaults, step_under_bf16_autocast


def reference_similarity(feature: Tensor) -> Tensor:
    """Official: the batch Gram matrix of the flattened maps, each row divided by its L2 norm (at least 1e-12)."""
    flat = feature.reshape(feature.shape[0], -1)
    gram = torch.einsum("id,jd->ij", flat, flat)
    return gram / torch.clamp(torch.sqrt((gram**2).sum(dim=1, keepdim=True)), min=1e-12)


def reference_sp(student: Tensor, teacher: Tensor) -> Tensor:
    batch = student.shape[0]
    return ((reference_similarity(teacher) - reference_similarity(student)) ** 2).sum() / batch**2


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [((8, 16, 4, 4), (8, 64, 4, 4)), ((8, 32, 8, 8), (8, 16, 2, 2)), ((8, 24), (8, 48))])
def test_loss_and_gradient_match_the_reference(student_shape: tuple, teacher_shape: tuple) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(student_shape, generator=generator), torch.randn(teacher_shape, generator=generator)
    assert_same_loss_and_gradient(similarity_loss, reference_sp, student, teacher)


def test_the_step_reads_the_last_stage_of_each_network() -> None:
    method = build(SimilarityPreserving, teacher="cifar_vgg8")
    assert method.pairs == [(3, 4)]  # RepDistiller's feat[-2] of each: stage counts may differ
    inputs, targets = torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))
    output = method.training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(output.losses) == {"ce", "similarity"}
    with torch.no_grad():
        student = method.student.forward_intermediates(inputs, intermediates_only=True)[-1]
        teacher = method.teacher.network.forward_intermediates(inputs, intermediates_only=True)[-1]
    expected = 3000 * reference_sp(student.double(), teacher.double())
    assert output.losses["similarity"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "sp", "--set", "method.layers=[2,3]")
    assert set(record["loss"]) == {"ce", "similarity", "total"}


def test_listed_with_the_official_benchmark_defaults() -> None:
    assert listed_defaults("sp") == {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "layers": [-1], "teacher_layers": None, "feature_weight": 3000.0}


def test_one_epoch_of_a_timm_student(teacher_run: Path, tmp_path: Path) -> None:
    """timm's EfficientNet (five stages after the stem, its own global_pool) against the CIFAR-zoo teacher."""
    record = distill_one_epoch(teacher_run, tmp_path, "sp", model="test_efficientnet")
    assert set(record["loss"]) == {"ce", "similarity", "total"}


def test_the_feature_loss_stays_float32_under_mixed_precision() -> None:
    # Autocast would run its matmuls in bf16; the student's forward itself does run in bf16.
    losses = step_under_bf16_autocast(build(SimilarityPreserving))
    assert losses["similarity"].dtype == torch.float32 and torch.isfinite(losses["similarity"])
