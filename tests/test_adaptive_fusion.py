"""adaptive-fusion (TGeo-KD): the hypergradient, the learned ratio, the baselines, the data it sees, resume."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import TINY, run_cli
from kdcli.checkpoint import load_state
from kdcli.config import RunConfig
from kdcli.data.augment import BatchAugment, normalize
from kdcli.data.bundle import ImageSplit
from kdcli.data.synthetic import make_synthetic
from kdcli.engine import Trainer, TrainingData
from kdcli.jobs.build import method_context
from kdcli.runtime import Runtime
from kdcli.losses import distillation_kl
from kdcli.method import Batch, FrozenTeacher, MethodContext, MethodError
from kdcli.models import create_model
from kdcli_plugins.adaptive_fusion import (
    AdaptiveFusion,
    AdaptiveFusionParams,
    BilevelProblem,
    FusionNetwork,
    ada_ratio,
    fused_loss,
    hypergradient,
    per_sample_terms,
    trilateral_geometry,
    wls_ratio,
)
from kdcli_plugins.kd import HintonKD, KDParams

CPU = torch.device("cpu")

# --- the hypergradient on a tiny float64 problem ----------------------------------------------------


def tiny_bilevel_problem(seed: int = 0) -> tuple[nn.Module, FusionNetwork, BilevelProblem]:
    torch.manual_seed(seed)
    classes, features, size = 3, 6, 16
    student = nn.Sequential(nn.Linear(features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes)).double().train()
    fusion = FusionNetwork(classes, hidden=16, initial_alpha=0.5).double()
    problem = BilevelProblem(
        inputs=torch.randn(size, features, dtype=torch.float64),
        targets=torch.randint(classes, (size,)),
        teacher_logits=3 * torch.randn(size, classes, dtype=torch.float64),
        class_means=torch.softmax(torch.randn(classes, classes, dtype=torch.float64), dim=1),
        val_inputs=torch.randn(size, features, dtype=torch.float64),
        val_targets=torch.randint(classes, (size,)),
        temperature=2.0,
        kl_reduction="batchmean",
        virtual_lr=0.5,
    )
    return student, fusion, problem


def objective_by_hand(student: nn.Module, fusion: FusionNetwork, problem: BilevelProblem) -> float:
    """F(w) the plain way: a real SGD step on a copy of the student, then its validation CE."""
    copied = copy.deepcopy(student)
    logits = copied(problem.inputs)
    alpha = fusion(trilateral_geometry(logits, problem.teacher_logits, problem.targets, problem.class_means))
    kd, ce = per_sample_terms(logits, problem.teacher_logits, problem.targets, problem.temperature, problem.kl_reduction)
    fused_loss(alpha, kd, ce).backward()
    torch.optim.SGD(copied.parameters(), lr=problem.virtual_lr).step()
    return F.cross_entropy(copied(problem.val_inputs), problem.val_targets).item()


def shift_(parameters: list[Tensor], direction: list[Tensor], step: float) -> None:
    with torch.no_grad():
        for parameter, delta in zip(parameters, direction):
            parameter.add_(step * delta)


def test_hypergradient_matches_finite_differences() -> None:
    student, fusion, problem = tiny_bilevel_problem()
    loss, grads = hypergradient(student, fusion, problem)
    assert loss.item() == pytest.approx(objective_by_hand(student, fusion, problem), rel=1e-12)
    parameters = list(fusion.parameters())
    epsilon = 1e-6
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        direction = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in parameters]
        shift_(parameters, direction, epsilon)
        above = objective_by_hand(student, fusion, problem)
        shift_(parameters, direction, -2 * epsilon)
        below = objective_by_hand(student, fusion, problem)
        shift_(parameters, direction, epsilon)
        numeric = (above - below) / (2 * epsilon)
        analytic = sum((grad * delta).sum() for grad, delta in zip(grads, direction)).item()
        assert abs(numeric) > 1e-4  # the objective really depends on w
        assert analytic == pytest.approx(numeric, rel=1e-6)


def test_first_order_hypergradient_approximates_the_exact_one() -> None:
    student, fusion, problem = tiny_bilevel_problem(seed=1)
    _, exact = hypergradient(student, fusion, problem)
    _, approximate = hypergradient(student, fusion, problem, first_order=True, fd_epsilon=1e-4)
    exact_flat, approximate_flat = (torch.cat([grad.flatten() for grad in grads]) for grads in (exact, approximate))
    torch.testing.assert_close(approximate_flat, exact_flat, rtol=1e-4, atol=1e-8)


def test_hypergradient_can_reuse_the_real_forward_pass() -> None:
    student, fusion, problem = tiny_bilevel_problem()
    _, own_forward = hypergradient(student, fusion, problem)
    _, shared_forward = hypergradient(student, fusion, problem, training_logits=student(problem.inputs))
    for own, shared in zip(own_forward, shared_forward):
        torch.testing.assert_close(shared, own)


@pytest.mark.parametrize("first_order", [False, True])
def test_hypergradient_leaves_the_student_and_its_batch_norm_statistics_untouched(first_order: bool) -> None:
    student, fusion, problem = tiny_bilevel_problem()
    before = copy.deepcopy(student.state_dict())
    hypergradient(student, fusion, problem, first_order=first_order)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(parameter.grad is None for parameter in student.parameters())


# --- the learned ratio in training --------------------------------------------------------------------


class HalfWrongTeacher(nn.Module):
    """Nearest-class-mean teacher that names the next class whenever the last input feature is positive."""

    def __init__(self, class_means: Tensor) -> None:
        super().__init__()
        self.register_buffer("class_means", class_means)

    def forward(self, inputs: Tensor) -> Tensor:
        logits = -torch.cdist(inputs, self.class_means) ** 2 / 4
        return torch.where(inputs[:, -1:] > 0, logits.roll(1, dims=1), logits)


def blob_context(classes: int, features: int, seed: int) -> tuple[MethodContext, Tensor]:
    """Gaussian blobs with clean labels; train and validation are separate draws."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, features, generator=generator)

    def draw(size: int) -> tuple[Tensor, Tensor]:
        targets = torch.randint(classes, (size,), generator=generator)
        return centres[targets] + torch.randn(size, features, generator=generator), targets

    splits = {"train": draw(512), "val": draw(256)}

    def batches(split: str, *, shuffle: bool = False, augment: bool = False, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        inputs, targets = splits[split]
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(targets))
        for index in order.split(batch_size or 64):
            yield Batch(inputs[index], targets[index], index)

    context = MethodContext(
        num_classes=classes, num_train=512, epochs=4, steps_per_epoch=8, device=CPU,
        mean=(0.0,), std=(1.0,), batches=batches, has_val=True,
    )
    return context, centres


def test_learned_ratio_trusts_the_teacher_less_where_it_is_wrong() -> None:
    torch.manual_seed(0)
    classes, features = 4, 8
    context, centres = blob_context(classes, features, seed=0)
    student = nn.Sequential(nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))
    params = AdaptiveFusionParams(meta_lr=1e-2, hidden=32)
    method = AdaptiveFusion(params, student=student, teacher=FrozenTeacher(HalfWrongTeacher(centres)), context=context)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    history = []
    for epoch in range(1, 5):
        method.on_epoch_start(epoch)
        for batch in context.batches("train", shuffle=True, seed=epoch):
            output = method.training_step(batch)
            optimizer.zero_grad()
            sum(output.losses.values()).backward()
            optimizer.step()
        history.append(method.on_epoch_end(epoch))
    first, last = history[0], history[-1]
    assert first["alpha_mean"] == pytest.approx(0.9, abs=0.05)  # starts where ratio=fixed stays
    assert 0.2 < last["teacher_wrong_frac"] < 0.8
    # The validation signal alone taught the fusion network to tell the two halves apart.
    assert last["alpha_teacher_right"] > 0.6
    assert last["alpha_teacher_wrong"] < 0.35
    assert last["alpha_q75"] - last["alpha_q25"] > 0.3


def test_the_fusion_network_learns_on_the_first_of_every_meta_every_steps() -> None:
    torch.manual_seed(0)
    context, centres = blob_context(4, 8, seed=0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    method = AdaptiveFusion(AdaptiveFusionParams(meta_every=3, hidden=16), student=student, teacher=FrozenTeacher(HalfWrongTeacher(centres)), context=context)
    assert method.fusion is not None
    method.on_epoch_start(1)
    updated_at = []
    for step, batch in enumerate(context.batches("train"), start=1):  # 8 steps
        before = [parameter.clone() for parameter in method.fusion.parameters()]
        method.training_step(batch)
        if any(not torch.equal(old, new) for old, new in zip(before, method.fusion.parameters())):
            updated_at.append(step)
    assert updated_at == [1, 4, 7]


def test_a_validation_split_too_small_for_a_batch_is_a_method_error() -> None:
    def batches(split: str, **options: object) -> Iterator[Batch]:
        return iter(())  # what the loader yields for a one-sample split

    context = MethodContext(num_classes=3, num_train=8, epochs=1, steps_per_epoch=1, device=CPU, mean=(0.0,), std=(1.0,), batches=batches, has_val=True)
    method = AdaptiveFusion(AdaptiveFusionParams(), student=nn.Linear(4, 3), teacher=FrozenTeacher(nn.Linear(4, 3)), context=context)
    method.class_means = torch.full((3, 3), 1 / 3)  # skip the pass over the (empty) training split
    method.on_epoch_start(1)
    with pytest.raises(MethodError, match="val-split"):
        method.training_step(Batch(torch.randn(8, 4), torch.randint(3, (8,)), torch.arange(8)))


# --- the baselines share the loss ---------------------------------------------------------------------


def test_ada_and_wls_ratios_follow_their_formulas() -> None:
    teacher_logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    targets = torch.tensor([0, 0])
    # ADA: p_t(y) - mean of the other classes, floored at 0.
    torch.testing.assert_close(ada_ratio(teacher_logits, targets), torch.tensor([0.7 - 0.15, 0.0]))
    student_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]]))
    expected = 1 - torch.exp(-torch.log(torch.tensor([2.0, 5.0])) / torch.log(torch.tensor([1 / 0.7, 10.0])))
    torch.testing.assert_close(wls_ratio(student_logits, teacher_logits, targets), expected)


def simple_context(classes: int) -> MethodContext:
    return MethodContext(num_classes=classes, num_train=8, epochs=1, steps_per_epoch=1, device=CPU, mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_fixed_ratio_is_kd(reduction: str) -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 4), nn.Linear(5, 4)
    batch = Batch(torch.randn(8, 5), torch.randint(4, (8,)), torch.arange(8))
    fusion = AdaptiveFusion(
        AdaptiveFusionParams(ratio="fixed", alpha=0.9, kl_reduction=reduction),
        student=student, teacher=FrozenTeacher(teacher), context=simple_context(4),
    )
    kd = HintonKD(KDParams(kl_reduction=reduction), student=student, teacher=FrozenTeacher(teacher), context=simple_context(4))
    fusion.on_epoch_start(1)
    ours, theirs = fusion.training_step(batch).losses, kd.training_step(batch).losses
    torch.testing.assert_close(ours["kd"], theirs["kd"])
    torch.testing.assert_close(ours["ce"], theirs["ce"])
    teacher_logits = teacher(batch.inputs)
    per_sample_kd, _ = per_sample_terms(student(batch.inputs), teacher_logits, batch.targets, 4.0, reduction)
    torch.testing.assert_close(per_sample_kd.mean(), distillation_kl(student(batch.inputs), teacher_logits, 4.0, reduction))


# --- the data it sees ---------------------------------------------------------------------------------


def random_split(count: int, targets: Tensor, seed: int) -> ImageSplit:
    images = torch.randint(256, (count, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return ImageSplit(images, targets)


@pytest.mark.parametrize("refresh", ["once", "epoch"])
def test_class_means_come_from_the_training_split_and_its_labels(refresh: str) -> None:
    classes = 3
    train = random_split(60, torch.arange(60) % classes, seed=0)
    val = random_split(20, torch.zeros(20, dtype=torch.int64), seed=1)  # every val label 0: would shift T̄_0
    mean, std = (0.5,) * 3, (0.25,) * 3
    data = TrainingData(train=train, val=val, augment=BatchAugment(mean, std, crop_padding=0, hflip=False), mean=mean, std=std, input_size=(3, 8, 8))
    config = RunConfig.model_validate({"train": {"batch_size": 16}})
    context = method_context(config, data, Runtime(device=CPU, autocast_dtype=None), classes)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)).requires_grad_(False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
    method = AdaptiveFusion(AdaptiveFusionParams(class_means=refresh), student=student, teacher=FrozenTeacher(teacher), context=context)

    probs = torch.softmax(teacher(normalize(train.images, mean, std)), dim=1)
    expected = torch.stack([probs[train.targets == label].mean(dim=0) for label in range(classes)])
    method.on_epoch_start(1)
    torch.testing.assert_close(method.class_means, expected)
    for batch in context.batches("train", shuffle=True, seed=3):
        method.training_step(batch)
    method.on_epoch_end(1)
    torch.testing.assert_close(method.class_means, expected)  # refreshed from the epoch's training batches: same


def test_label_flip_changes_a_fraction_of_train_labels_and_nothing_else() -> None:
    clean = make_synthetic(num_train=400, num_test=100)
    noisy = make_synthetic(num_train=400, num_test=100, label_flip=0.25)
    again = make_synthetic(num_train=400, num_test=100, label_flip=0.25)
    flipped = clean.train.targets != noisy.train.targets
    assert flipped.sum().item() == 100  # every chosen label moves to another class
    assert torch.equal(noisy.train.targets, again.train.targets)
    assert torch.equal(noisy.train.images, clean.train.images) and torch.equal(noisy.train.p_star, clean.train.p_star)
    assert torch.equal(noisy.test.targets, clean.test.targets) and torch.equal(noisy.test.images, clean.test.images)



def test_clean_held_out_set_keeps_true_labels_on_validation_only() -> None:
    from kdcli.config import DataConfig
    from kdcli.jobs.common import evaluation_split, load_data

    def splits(**synthetic: object) -> tuple[Tensor, Tensor]:
        config = DataConfig(val_split=0.2, split_seed=3, synthetic={"num_train": 400, "num_test": 50, **synthetic})
        bundle = load_data(config)
        return evaluation_split(bundle, config, "train").targets, evaluation_split(bundle, config, "val").targets

    clean_train, clean_val = splits()
    noisy_train, noisy_val = splits(label_flip=0.25)
    held_train, held_val = splits(label_flip=0.25, label_flip_val=False)
    assert torch.equal(held_val, clean_val) and not torch.equal(noisy_val, clean_val)
    assert torch.equal(held_train, noisy_train) and not torch.equal(held_train, clean_train)

# --- through the CLI ----------------------------------------------------------------------------------


def rows(batches: list[Tensor]) -> set[bytes]:
    return {row.numpy().tobytes() for row in torch.cat(batches)}


def test_distill_adaptive_fusion_end_to_end(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen_train: list[Tensor] = []
    seen_val: list[Tensor] = []
    original_step, original_val = AdaptiveFusion.training_step, AdaptiveFusion._endless_val_batches

    def training_step(self: AdaptiveFusion, batch: Batch) -> object:
        seen_train.append(batch.inputs.clone())
        return original_step(self, batch)

    def endless_val_batches(self: AdaptiveFusion, seed: int) -> Iterator[Batch]:
        for batch in original_val(self, seed):
            seen_val.append(batch.inputs.clone())
            yield batch

    monkeypatch.setattr(AdaptiveFusion, "training_step", training_step)
    monkeypatch.setattr(AdaptiveFusion, "_endless_val_batches", endless_val_batches)
    out = tmp_path / "student"
    result = run_cli(
        "distill", "--method", "adaptive-fusion", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8",
        "--epochs", 2, "--out", out, "--set", "method.meta_every=2", "--json", *TINY,
    )
    assert result.exit_code == 0, result
    # Validation batches drive the fusion network and are never training samples.
    assert len(seen_val) == 9 and rows(seen_val).isdisjoint(rows(seen_train))  # steps 1, 3, ..., 17 of 18

    keys = {"alpha_mean", "alpha_q25", "alpha_median", "alpha_q75", "alpha_teacher_right", "alpha_teacher_wrong", "meta_val_ce"}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        numbers = json.loads(line)["method"]
        assert keys <= numbers.keys()
        assert 0 < numbers["alpha_q25"] <= numbers["alpha_median"] <= numbers["alpha_q75"] < 1
    assert keys <= result.json()["final_epoch"]["method"].keys()

    # The deployable checkpoint is the student alone; the fusion network lives in the resume state.
    student = create_model("cifar_resnet8", num_classes=10, input_size=(3, 16, 16))
    assert set(safetensors.torch.load_file(out / "last.safetensors")) == set(student.state_dict())
    method_state = load_state(out / "resume.safetensors")["method"]  # the method module's state_dict()
    extra = method_state["_extra_state"]
    assert extra["steps"] == 18 and extra["fusion_optimizer"]["state"]  # 9 steps per epoch, Adam moments
    fusion = {key.removeprefix("fusion.") for key in method_state if key.startswith("fusion.")}
    assert fusion == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    assert method_state["class_means"].shape == (10, 10)
    assert not torch.isnan(method_state["alpha_by_sample"]).any()


def test_resume_reproduces_the_uninterrupted_run(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = [
        "distill", "--method", "adaptive-fusion", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8",
        "--epochs", 3, "--set", "train.deterministic=true", "--set", "method.meta_every=2", *TINY,
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*run, "--out", straight).exit_code == 0
    original = Trainer.train_epoch

    def train_epoch(self: Trainer, epoch: int) -> dict:
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", train_epoch)
        assert run_cli(*run, "--out", resumed).exit_code == 130
    finished = run_cli("distill", "--resume", resumed, "-q")
    assert finished.exit_code == 0, finished
    assert "method, last epoch: alpha_mean" in finished.stdout  # the summary shows the alpha diagnostics

    for name in ("last.safetensors", "resume.safetensors"):
        expected, actual = (safetensors.torch.load_file(root / name) for root in (straight, resumed))
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("time_s", "samples_per_s")}  # noqa: E731
    straight_lines, resumed_lines = ((root / "metrics.jsonl").read_text().splitlines() for root in (straight, resumed))
    assert [strip(line) for line in straight_lines] == [strip(line) for line in resumed_lines]


def test_learned_ratio_needs_a_validation_split(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli(
        "distill", "--method", "adaptive-fusion", "--teacher", teacher_run / "last.safetensors",
        "--val-split", 0, "--epochs", 1, "--out", tmp_path / "student", *TINY,
    )
    assert result.exit_code == 2
    assert "--val-split" in result.stderr and "Traceback" not in result.stderr
