"""DKD's loss against the paper's decomposition and the official formulation, and its warm-up."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.config import build_config
from kdcli.jobs.build import resolve_run
from kdcli.losses import distillation_kl
from kdcli.method import Batch, FrozenTeacher, MethodContext
from kdcli.registry import get_method
from kdcli_dkd import DKD, DKDParams, decoupled_kd_terms, warmup_factor

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def random_batch(batch: int = 8, classes: int = 10, scale: float = 3.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator) * scale
    teacher = torch.randn(batch, classes, generator=generator) * scale
    targets = torch.randint(classes, (batch,), generator=generator)
    return student, teacher, targets


def reference_terms(student, teacher, targets, temperature):
    """The paper's definitions in probability space, written independently of the plugin."""
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    rows = torch.arange(len(targets))
    b_s = torch.stack([p_s[rows, targets], 1 - p_s[rows, targets]], dim=1)
    b_t = torch.stack([p_t[rows, targets], 1 - p_t[rows, targets]], dim=1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(dim=1).mean()
    others = ~F.one_hot(targets, student.shape[1]).bool()
    hat_s = (p_s * others) / (p_s * others).sum(dim=1, keepdim=True)
    hat_t = (p_t * others) / (p_t * others).sum(dim=1, keepdim=True)
    nckd = torch.where(others, hat_t * (hat_t.log() - hat_s.log()), torch.zeros(())).sum(dim=1).mean()
    return tckd * temperature**2, nckd * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_terms_match_the_definitions(temperature: float) -> None:
    student, teacher, targets = random_batch()
    tckd, nckd = decoupled_kd_terms(student, teacher, targets, temperature)
    expected_tckd, expected_nckd = reference_terms(student.double(), teacher.double(), targets, temperature)
    assert tckd.item() == pytest.approx(expected_tckd.item(), rel=1e-5)
    assert nckd.item() == pytest.approx(expected_nckd.item(), rel=1e-5)
    assert tckd > 0 and nckd > 0


def test_kd_decomposes_into_tckd_and_weighted_nckd() -> None:
    # Zhao et al., eq. (5): KD = TCKD + (1 - p_t^T) * NCKD, per sample.
    student, teacher, targets = random_batch(batch=6)
    for i in range(len(targets)):
        s, t, y = student[i : i + 1], teacher[i : i + 1], targets[i : i + 1]
        tckd, nckd = decoupled_kd_terms(s, t, y, 4.0)
        teacher_target_prob = F.softmax(t / 4.0, dim=1)[0, y].item()
        kd = distillation_kl(s, t, 4.0)
        assert kd.item() == pytest.approx((tckd + (1 - teacher_target_prob) * nckd).item(), rel=1e-4)


def test_nckd_ignores_the_target_logit_and_tckd_the_split_among_the_others() -> None:
    student, teacher, targets = random_batch(batch=4)
    student.requires_grad_(True)
    _, nckd = decoupled_kd_terms(student, teacher, targets, 4.0)
    (gradient,) = torch.autograd.grad(nckd, student)
    rows = torch.arange(len(targets))
    assert gradient[rows, targets].abs().max() < 1e-12
    assert gradient.abs().max() > 1e-4

    with torch.no_grad():
        shuffled = student.clone()
        for i, y in enumerate(targets.tolist()):
            others = [k for k in range(student.shape[1]) if k != y]
            shuffled[i, others] = student[i, others].flip(0)
        tckd, _ = decoupled_kd_terms(student, teacher, targets, 4.0)
        tckd_shuffled, nckd_shuffled = decoupled_kd_terms(shuffled, teacher, targets, 4.0)
    assert tckd_shuffled.item() == pytest.approx(tckd.item(), rel=1e-5)
    assert nckd_shuffled.item() != pytest.approx(nckd.item(), rel=1e-3)


def test_confident_logits_stay_finite() -> None:
    student, teacher, targets = random_batch(scale=80.0)
    student[torch.arange(len(targets)), targets] = 500.0  # student all but certain
    tckd, nckd = decoupled_kd_terms(student, teacher, targets, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


@pytest.mark.parametrize(("epoch", "warmup", "factor"), [(1, 20, 0.05), (10, 20, 0.5), (20, 20, 1.0), (35, 20, 1.0), (1, 0, 1.0)])
def test_warmup_factor(epoch: int, warmup: int, factor: float) -> None:
    assert warmup_factor(epoch, warmup) == pytest.approx(factor)


def make_method(**params: float) -> DKD:
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5).eval()
    context = MethodContext(
        num_classes=5, num_train=16, epochs=30, steps_per_epoch=2, device=torch.device("cpu"), mean=(0.5,), std=(0.25,)
    )
    return DKD(DKDParams(**params), student=student, teacher=FrozenTeacher(teacher), context=context)


def test_training_step_weights_each_term_and_warms_up() -> None:
    method = make_method(alpha=0.5, beta=2.0, ce_weight=0.7, warmup_epochs=10)
    batch = Batch(torch.randn(8, 6), torch.randint(5, (8,)), torch.arange(8))
    with torch.no_grad():
        tckd, nckd = decoupled_kd_terms(method.student(batch.inputs), method.teacher_logits(batch), batch.targets, 4.0)
        ce = F.cross_entropy(method.student(batch.inputs), batch.targets)
    for epoch, weight in ((1, 0.1), (4, 0.4), (12, 1.0)):
        method.on_epoch_start(epoch)
        output = method.training_step(batch)
        assert set(output.losses) == {"ce", "tckd", "nckd"}
        assert output.losses["ce"].item() == pytest.approx(0.7 * ce.item(), rel=1e-5)
        assert output.losses["tckd"].item() == pytest.approx(weight * 0.5 * tckd.item(), rel=1e-5)
        assert output.losses["nckd"].item() == pytest.approx(weight * 2.0 * nckd.item(), rel=1e-5)
        assert method.on_epoch_end(epoch) == {"kd_weight": pytest.approx(weight)}
    output.losses["nckd"].backward()
    assert method.student.weight.grad is not None and method.teacher.network.weight.grad is None


def test_defaults_are_the_papers() -> None:
    assert DKDParams().model_dump() == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup_epochs": 20}


def test_registered_through_the_kdcli_methods_entry_point() -> None:
    (entry_point,) = [ep for ep in entry_points(group="kdcli.methods") if ep.name == "dkd-example"]
    assert entry_point.value == "kdcli_dkd:DKD" and entry_point.dist.name == "kdcli-dkd"
    assert get_method("dkd-example") is DKD


def test_anchor_config_resolves_to_the_published_recipe() -> None:
    config = build_config(
        file=CONFIGS / "cifar100_resnet32x4_resnet8x4.toml", flags={"job": "distill", "teacher": "resnet32x4.safetensors"}
    )
    spec = resolve_run(config)
    resolved, method, params = spec.config, spec.method, spec.params
    assert method is DKD and params == DKDParams()
    assert resolved.model.name == "cifar_resnet8x4" and resolved.data.name == "cifar100"
    assert (resolved.train.epochs, resolved.train.batch_size, resolved.optim.lr) == (240, 64, 0.05)
    assert resolved.schedule.milestones == [150, 180, 210]
