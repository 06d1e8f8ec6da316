"""Teacher-free KD (tfkd-self, tfkd-virtual), reversed and defective KD, and the official recipe's pieces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import TINY, run_cli
from kdcli.config import ScheduleConfig, build_config
from kdcli.data.augment import rotate
from kdcli.optim import lr_factor
from kdcli.jobs.teacher_relation import TeacherRelation
from kdcli.jobs.build import resolve_run
from kdcli.method import Batch, FrozenTeacher, MethodContext
from kdcli_plugins.tfkd_self import TfKDSelf, TfKDSelfParams
from kdcli_plugins.tfkd_virtual import TfKDVirtual, TfKDVirtualParams, virtual_teacher_targets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tfkd"
BATCH, CLASSES, FEATURES = 6, 5, 4


def context() -> MethodContext:
    return MethodContext(
        num_classes=CLASSES, num_train=BATCH, epochs=1, steps_per_epoch=1,
        device=torch.device("cpu"), mean=(0.0,), std=(1.0,),
    )


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, CLASSES)


def batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, FEATURES, generator=generator) * 3
    targets = torch.randint(CLASSES, (BATCH,), generator=generator)
    return Batch(inputs, targets, torch.arange(BATCH))


# -- by-hand references: sums of p * log(p / q) written out, no torch loss functions ----------


def softmax_by_hand(values: Tensor) -> Tensor:
    exp = (values - values.max(dim=1, keepdim=True).values).exp()
    return exp / exp.sum(dim=1, keepdim=True)


def cross_entropy_by_hand(logits: Tensor, targets: Tensor) -> Tensor:
    return -softmax_by_hand(logits)[torch.arange(len(targets)), targets].log().mean()


def kl_by_hand(target: Tensor, student_probs: Tensor, reduction: str) -> Tensor:
    total = (target * (target.log() - student_probs.log())).sum()
    return total / (target.shape[0] if reduction == "batchmean" else target.numel())


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_tfkd_self_loss_equals_hand_computation(reduction: str) -> None:
    params = TfKDSelfParams(alpha=0.7, temperature=3.0, multiplier=2.5, kl_reduction=reduction)
    student, teacher = linear(1), linear(2).eval()
    method = TfKDSelf(params, student=student, teacher=FrozenTeacher(teacher), context=context())
    data = batch()
    output = method.training_step(data)

    z_s, z_t, tau = student(data.inputs), teacher(data.inputs), 3.0
    kl = kl_by_hand(softmax_by_hand(z_t / tau), softmax_by_hand(z_s / tau), reduction)
    torch.testing.assert_close(output.losses["ce"], 0.3 * cross_entropy_by_hand(z_s, data.targets))
    torch.testing.assert_close(output.losses["kd"], 0.7 * 2.5 * tau**2 * kl)
    # Only the student learns: the teacher's logits carry no graph.
    sum(output.losses.values()).backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("temper_student", [False, True])
def test_tfkd_virtual_loss_equals_hand_computation(reduction: str, temper_student: bool) -> None:
    params = TfKDVirtualParams(
        alpha=0.6, temperature=4.0, correct_prob=0.95, multiplier=3.0,
        temper_student=temper_student, kl_reduction=reduction,
    )
    student = linear(3)
    method = TfKDVirtual(params, student=student, teacher=None, context=context())
    data = batch()
    output = method.training_step(data)

    z_s = student(data.inputs)
    virtual = torch.full((BATCH, CLASSES), 0.05 / (CLASSES - 1))
    virtual[torch.arange(BATCH), data.targets] = 0.95
    target = softmax_by_hand(virtual / 4.0)  # the temperature divides probabilities (official code)
    student_probs = softmax_by_hand(z_s / 4.0 if temper_student else z_s)
    torch.testing.assert_close(output.losses["ce"], 0.4 * cross_entropy_by_hand(z_s, data.targets))
    torch.testing.assert_close(output.losses["kd"], 0.6 * 3.0 * kl_by_hand(target, student_probs, reduction))


def test_tfkd_defaults_follow_the_official_code() -> None:
    virtual = TfKDVirtualParams()
    assert (virtual.alpha, virtual.temperature, virtual.correct_prob, virtual.multiplier) == (0.95, 40.0, 0.99, 1.0)
    assert virtual.temper_student is False and virtual.kl_reduction == "mean"
    self_params = TfKDSelfParams()
    assert (self_params.alpha, self_params.temperature, self_params.multiplier) == (0.95, 20.0, 1.0)
    assert self_params.kl_reduction == "mean"


@pytest.mark.parametrize(
    ("temperature", "true_class", "other_class"),
    # softmax(p^d / tau) for C = 100, a = 0.99, (1 - a) / 99 elsewhere: 1 / (1 + 99 e^{(b - a) / tau}).
    [(10, 0.01102907515389203, 0.009989605301475838),
     (20, 0.010502074071962625, 0.00999492854472765),
     (40, 0.01024799459090263, 0.009997495004132297)],
)
def test_virtual_teacher_distribution_for_cifar100(temperature: float, true_class: float, other_class: float) -> None:
    targets = torch.tensor([0, 42, 99])
    probs = virtual_teacher_targets(targets, 100, 0.99, temperature).double()
    b = 0.01 / 99
    closed_form = 1.0 / (1.0 + 99.0 * math.exp((b - 0.99) / temperature))
    assert true_class == pytest.approx(closed_form, rel=1e-12)
    assert probs[torch.arange(3), targets].tolist() == pytest.approx([true_class] * 3, rel=1e-6)
    others = probs.clone()
    others[torch.arange(3), targets] = float("nan")
    assert others[~others.isnan()].tolist() == pytest.approx([other_class] * 297, rel=1e-6)
    assert probs.sum(dim=1).tolist() == pytest.approx([1.0] * 3, rel=1e-6)


def test_virtual_teacher_correct_prob_must_be_at_least_0_9() -> None:
    with pytest.raises(ValueError, match="correct_prob"):
        TfKDVirtualParams(correct_prob=0.5)


# -- the situation a distillation run is in ---------------------------------------------------


def relation(**changes: object) -> TeacherRelation:
    fields: dict[str, object] = dict(
        teacher_arch="big", student_arch="small", teacher_params=200, student_params=100,
        teacher_epoch=30, teacher_run_epochs=30, teacher_top1=0.8, student_top1=0.7, test_samples=10_000,
    )
    return TeacherRelation(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({}, "standard KD"),
        ({"teacher_arch": "small"}, "self-distillation"),
        ({"teacher_params": 50, "teacher_top1": 0.6}, "reversed KD"),
        ({"teacher_epoch": 1, "teacher_top1": 0.15}, "defective KD"),
        ({"teacher_arch": "small", "teacher_epoch": 1, "teacher_top1": 0.15}, "defective KD"),
        ({"teacher_epoch": 1}, "standard KD"),  # an early checkpoint that still teaches well is not defective
        ({"teacher_run_epochs": None, "teacher_params": 50, "teacher_top1": 0.6}, "reversed KD"),
        # A larger teacher that is less accurate is poorly trained, not reversed (cifar_resnet20 -> cifar_resnet8 in make demo).
        ({"teacher_top1": 0.6}, "defective KD"),
        ({"teacher_run_epochs": None, "teacher_top1": 0.6}, "defective KD"),
        ({"teacher_params": 50}, "standard KD"),  # smaller but more accurate: the roles are not swapped
        # Within sampling noise (2 standard errors: about 0.085 on 240 samples, 0.013 on 10,000) a lower top-1 is no evidence.
        ({"teacher_top1": 0.65, "test_samples": 240}, "standard KD"),
        ({"teacher_epoch": 1, "teacher_top1": 0.65, "test_samples": 240}, "standard KD"),
        ({"teacher_params": 50, "teacher_top1": 0.69}, "standard KD"),
        ({"teacher_top1": 0.6, "test_samples": 240}, "defective KD"),
    ],
)
def test_teacher_relation_names_the_situation(changes: dict[str, object], kind: str) -> None:
    assert relation(**changes).kind == kind


def test_teacher_relation_facts() -> None:
    facts = relation(teacher_params=50, teacher_top1=0.6, teacher_epoch=3).facts()
    assert facts[0] == "big teaches small"
    assert any("fewer parameters" in fact for fact in facts)
    assert any("less accurate" in fact and "0.6000 vs 0.7000" in fact for fact in facts)
    assert any("epoch 3 of 30" in fact for fact in facts)
    assert relation(teacher_arch="small").facts() == ["same architecture"]
    beyond = " ".join(relation(teacher_top1=0.6).facts())
    assert "the gap exceeds its sampling noise ±0.0134 on 10000 test samples" in beyond
    within = relation(teacher_top1=0.65, test_samples=240)
    assert not within.less_accurate_teacher and within.accuracy_noise == pytest.approx(2 * (0.65 * 0.35 / 240 + 0.7 * 0.3 / 240) ** 0.5)
    assert any(fact.startswith("teacher and student equally accurate within sampling noise ±0.0854 on 240") for fact in within.facts())


# -- through the CLI --------------------------------------------------------------------------


def test_tfkd_self_student_defaults_to_the_teachers_architecture(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli(
        "distill", "--method", "tfkd-self", "--teacher", teacher_run / "last.safetensors",
        "--epochs", 1, "--out", tmp_path / "self", "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["model"] == summary["teacher_arch"] == "cifar_resnet14"
    assert set(summary["final_epoch"]["loss"]) == {"ce", "kd", "total"}
    relation = summary["teacher_relation"]
    assert relation["same_architecture"] and relation["teacher_params"] == relation["student_params"]
    assert (relation["teacher_epoch"], relation["teacher_run_epochs"], relation["early_checkpoint"]) == (3, 3, False)
    assert relation["teacher_top1"] == summary["teacher_test"]["top1"]
    assert relation["kind"] == "self-distillation" and relation["facts"][0] == "same architecture"


def test_tfkd_virtual_runs_without_a_teacher_and_teaches_reversed_kd(tmp_path: Path) -> None:
    virtual = run_cli("distill", "--method", "tfkd-virtual", "--epochs", 1, "--out", tmp_path / "virtual", "--json", *TINY)
    assert virtual.exit_code == 0, virtual
    summary = virtual.json()
    assert summary["model"] == "cifar_resnet8" and summary["teacher"] is None and summary["teacher_relation"] is None
    assert set(summary["final_epoch"]["loss"]) == {"ce", "kd", "total"}

    # Reversed KD needs no method of its own: the small cifar_resnet8 teaches a larger network.
    reversed_kd = run_cli(
        "distill", "--teacher", tmp_path / "virtual" / "last.safetensors", "--model", "cifar_resnet14",
        "--epochs", 1, "--out", tmp_path / "reversed", *TINY,
    )
    assert reversed_kd.exit_code == 0, reversed_kd
    shown = " ".join(reversed_kd.stdout.split())  # undo rich's line wrapping
    assert "teacher vs student:" in shown and "cifar_resnet8 teaches cifar_resnet14" in shown
    assert "teacher has fewer parameters (0.08M vs 0.18M)" in shown


def test_defective_kd_from_an_early_checkpoint(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli(
        "distill", "--method", "tfkd-self", "--teacher", teacher_run / "checkpoints" / "epoch_0001.safetensors",
        "--model", "cifar_resnet8", "--epochs", 1, "--out", tmp_path / "defective", "--json", *TINY,
    )
    assert result.exit_code == 0, result
    relation = result.json()["teacher_relation"]
    assert (relation["teacher_epoch"], relation["teacher_run_epochs"], relation["early_checkpoint"]) == (1, 3, True)
    assert relation["teacher_arch"] == "cifar_resnet14" and relation["student_arch"] == "cifar_resnet8"
    assert not relation["smaller_teacher"] and not relation["same_architecture"]
    expected = "defective KD" if relation["less_accurate_teacher"] else "standard KD"
    assert relation["kind"] == expected


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result


def test_teacher_errors_say_why(teacher_run: Path, tmp_path: Path) -> None:
    virtual = run_cli("distill", "--method", "tfkd-virtual", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "v")
    assert_one_line_error(virtual, "tfkd-virtual", "uses no teacher network", "hand-designed distribution", "tfkd-self", "drop --teacher")
    self_without = run_cli("distill", "--method", "tfkd-self", "--out", tmp_path / "s")
    assert_one_line_error(self_without, "tfkd-self", "needs a teacher", "--teacher")
    bad_a = run_cli("distill", "--method", "tfkd-virtual", "--set", "method.correct_prob=0.5", "--out", tmp_path / "a")
    assert_one_line_error(bad_a, "method.correct_prob", "0.5")
    assert not any((tmp_path / name).exists() for name in ("v", "s", "a"))


# -- the official recipe: example configs, warm-up + multistep schedule, rotation -------------

# Official per-model settings (alpha, tau, M), all with nn.KLDivLoss()'s reduction="mean".
OFFICIAL = {
    ("mobilenetv2", "self"): (0.95, 20.0, 1.0),
    ("shufflenetv2", "self"): (0.95, 20.0, 1.0),
    ("resnet18", "self"): (0.95, 6.0, 50.0),
    ("mobilenetv2", "virtual"): (0.95, 40.0, 1.0),
    ("shufflenetv2", "virtual"): (0.95, 10.0, 1.0),
    ("resnet18", "virtual"): (0.1, 20.0, 100.0),
}


# timm names; cifar_shufflenetv2 is the CIFAR zoo's (RepDistiller's ShuffleV2; see the config).
TIMM_NAMES = {"mobilenetv2": "mobilenetv2_100", "shufflenetv2": "cifar_shufflenetv2", "resnet18": "resnet18"}


@pytest.mark.parametrize(("model", "variant"), [(m, v) for m in ("mobilenetv2", "shufflenetv2", "resnet18") for v in ("baseline", "self", "virtual")])
def test_example_configs_hold_the_official_settings(model: str, variant: str) -> None:
    path = EXAMPLES / f"{model}_{variant}.toml"
    flags: dict[str, object] = {"job": "teach" if variant == "baseline" else "distill"}
    if variant == "self":
        flags["teacher"] = "teacher.safetensors"
    spec = resolve_run(build_config(file=path, flags=flags))
    config, params = spec.config, spec.params
    assert config.data.name == "cifar100" and config.data.rotation == 15.0 and config.data.val_split == 0.0
    assert config.train.epochs == 200
    assert config.optim.lr == pytest.approx(0.1 * config.train.batch_size / 128)
    assert (config.optim.momentum, config.optim.weight_decay) == (0.9, 5e-4)
    schedule = config.schedule
    assert (schedule.name, schedule.milestones, schedule.gamma, schedule.warmup_epochs) == ("multistep", [60, 120, 160], 0.2, 1.0)
    if variant == "baseline":
        assert config.method.name == "standard"
    else:
        assert config.method.name == f"tfkd-{variant}"
        assert (params.alpha, params.temperature, params.multiplier) == OFFICIAL[(model, variant)]
        assert params.kl_reduction == "mean"
    assert config.model.name == TIMM_NAMES[model]


def test_warmup_and_multistep_follow_the_official_schedule() -> None:
    # Official: WarmUpLR steps before every batch of epoch 0 (lr * m / N for batch m), then
    # MultiStepLR(milestones=[60, 120, 160], gamma=0.2) stepped once per later epoch.
    schedule = ScheduleConfig(name="multistep", milestones=[60, 120, 160], gamma=0.2, warmup_epochs=1.0)
    steps = 10

    def factor(epoch_index: int, batch_index: int = 0) -> float:
        return lr_factor(epoch_index * steps + batch_index, schedule=schedule, epochs=200, steps_per_epoch=steps)

    assert [factor(0, b) for b in range(steps)] == pytest.approx([(b + 1) / steps for b in range(steps)])
    expected = {1: 1.0, 59: 1.0, 60: 0.2, 119: 0.2, 120: 0.04, 159: 0.04, 160: 0.008, 199: 0.008}
    for epoch_index, value in expected.items():
        assert factor(epoch_index, 0) == pytest.approx(value) == factor(epoch_index, steps - 1)


@pytest.mark.parametrize("degrees", [15.0, -15.0, 7.3])
def test_rotation_matches_torchvision_random_rotation_at_any_angle(degrees: float) -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([TF.rotate(image, degrees, interpolation=InterpolationMode.NEAREST) for image in images])
    assert torch.equal(rotate(images, torch.full((3,), degrees)), expected)
