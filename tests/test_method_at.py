"""at (attention transfer, RepDistiller AT.py): the loss against a reference, the stages it pairs, a real epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import TINY, run_cli
from kdcli.method import Batch, MethodError
from kdcli_plugins.at import AttentionTransfer, attention_loss
from method_zoo import INPUT_SIZE, assert_same_loss_and_gradient, build, distill_one_epoch, listed_defaults


def reference_attention(feature: Tensor, p: float) -> Tensor:
    """Official: the channel mean of F^p per position, flattened, divided by its L2 norm (at least 1e-12)."""
    flat = (feature**p).sum(dim=1).reshape(feature.shape[0], -1) / feature.shape[1]
    return flat / torch.sqrt((flat * flat).sum(dim=1, keepdim=True)).clamp(min=1e-12)


def reference_at(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Official: the larger map average-pooled to the smaller's height (square maps), then the mean squared difference."""
    if student.shape[2] > teacher.shape[2]:
        student = torch.nn.AdaptiveAvgPool2d(teacher.shape[2])(student)
    elif student.shape[2] < teacher.shape[2]:
        teacher = torch.nn.AdaptiveAvgPool2d(student.shape[2])(teacher)
    difference = reference_attention(student, p) - reference_attention(teacher, p)
    return (difference**2).sum() / difference.numel()


@pytest.mark.parametrize(("student_shape", "teacher_shape", "p"), [
    ((8, 16, 8, 8), (8, 32, 8, 8), 2.0),  # equal maps, different widths
    ((8, 16, 8, 8), (8, 64, 4, 4), 2.0),  # the student's larger map is pooled
    ((8, 16, 4, 4), (8, 8, 8, 8), 2.0),  # the teacher's larger map is pooled
    ((8, 16, 6, 6), (8, 8, 4, 4), 2.0),  # sizes that do not divide: adaptive pooling
    ((8, 16, 8, 8), (8, 32, 8, 8), 4.0),
])
def test_loss_and_gradient_match_the_reference(student_shape: tuple, teacher_shape: tuple, p: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(student_shape, generator=generator), torch.randn(teacher_shape, generator=generator)
    assert_same_loss_and_gradient(lambda s, t: attention_loss(s, t, p), lambda s, t: reference_at(s, t, p), student, teacher)


def test_every_stage_after_the_stem_paired_as_repdistiller_zips_them() -> None:
    assert build(AttentionTransfer).pairs == [(1, 1), (2, 2), (3, 3)]
    # A teacher with four stages after the stem against a student with three: its last stage is left out.
    assert build(AttentionTransfer, teacher="cifar_vgg8").pairs == [(1, 1), (2, 2), (3, 3)]
    assert build(AttentionTransfer, layers=[-1, 2], teacher_layers=[4, 1], teacher="cifar_vgg8").pairs == [(3, 4), (2, 1)]
    assert build(AttentionTransfer, layers=[2]).pairs == [(2, 2)]
    with pytest.raises(MethodError, match=r"need equally many entries, got \[1, 2\] and \[1\]"):
        build(AttentionTransfer, layers=[1, 2], teacher_layers=[1])


def test_the_step_sums_beta_times_the_loss_of_each_stage_pair() -> None:
    method = build(AttentionTransfer, teacher="cifar_vgg8")
    inputs, targets = torch.randn(8, *INPUT_SIZE), torch.randint(0, 10, (8,))
    output = method.training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(output.losses) == {"ce", "attention"}
    with torch.no_grad():
        student = method.student.forward_intermediates(inputs, intermediates_only=True)
        teacher = method.teacher.network.forward_intermediates(inputs, intermediates_only=True)
    expected = 1000 * sum(reference_at(student[i].double(), teacher[i].double()) for i in (1, 2, 3))
    assert output.losses["attention"].item() == pytest.approx(expected.item(), rel=1e-5)
    with_kd = build(AttentionTransfer, kd_weight=0.9).training_step(Batch(inputs, targets, torch.arange(8)))
    assert set(with_kd.losses) == {"ce", "kd", "attention"}


def test_a_stage_the_student_lacks_is_refused_before_anything_is_written(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = run_cli("distill", "--method", "at", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8",
                     "--set", "method.layers=[5]", "--out", out, *TINY)
    assert result.exit_code == 2 and not out.exists(), result
    assert result.stderr.strip() == "kdcli: error: method.layers: the student has stage indices 0..3 (or -4..-1), got [5]"


def test_one_epoch_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    record = distill_one_epoch(teacher_run, tmp_path, "at")
    assert set(record["loss"]) == {"ce", "attention", "total"}


def test_listed_with_the_official_benchmark_defaults() -> None:
    assert listed_defaults("at") == {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "layers": None, "teacher_layers": None, "feature_weight": 1000.0, "p": 2.0}


def test_one_epoch_of_a_timm_student(teacher_run: Path, tmp_path: Path) -> None:
    """timm's EfficientNet (five stages after the stem, its own global_pool) against the CIFAR-zoo teacher."""
    record = distill_one_epoch(teacher_run, tmp_path, "at", model="test_efficientnet")
    assert set(record["loss"]) == {"ce", "attention", "total"}

