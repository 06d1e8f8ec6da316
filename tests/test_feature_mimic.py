"""feature-mimic (Hong et al. 2021): clean teacher, noisy student, stage features, noisy-val selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.distributed as dist
from torch import nn

from conftest import TINY, run_cli
from kdcli.checkpoint import load_state, read_checkpoint_info
from kdcli.config import DataConfig
from kdcli.data.augment import BatchAugment, normalize
from kdcli.noise import PixelNoise
from kdcli.errors import UsageError
from kdcli.jobs.common import evaluation_split, load_data, model_from_checkpoint
from kdcli.method import Batch, FrozenTeacher, MethodContext, logits_and_features
from kdcli.task import TrainableModule
from kdcli.models import create_model
from kdcli.registry import load_model_plugins
from kdcli_plugins.feature_mimic import FeatureMimic, FeatureMimicParams

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.2, 0.1)
INPUT_SIZE = (3, 16, 16)

load_model_plugins()  # the cifar_* zoo


def context() -> MethodContext:
    return MethodContext(
        num_classes=10, num_train=64, epochs=1, steps_per_epoch=1, device=torch.device("cpu"),
        mean=MEAN, std=STD, input_size=INPUT_SIZE,
    )


def build(student: str = "cifar_resnet8", teacher: str = "cifar_resnet14", **params: object) -> FeatureMimic:
    torch.manual_seed(0)
    return FeatureMimic(
        FeatureMimicParams.model_validate(params),
        student=create_model(student, num_classes=10, input_size=INPUT_SIZE),
        teacher=FrozenTeacher(create_model(teacher, num_classes=10, input_size=INPUT_SIZE)),
        context=context(),
    )


def augmented_batch(size: int = 16) -> Batch:
    images = torch.randint(0, 256, (size, *INPUT_SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = BatchAugment(MEAN, STD, crop_padding=2, hflip=True)(images, torch.Generator().manual_seed(1))
    return Batch(inputs, torch.randint(0, 10, (size,)), torch.arange(size))


def stem_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Records what the model's first conv sees (forward_intermediates bypasses ``forward`` hooks)."""
    seen: list[torch.Tensor] = []
    first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def pixel_difference(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (noisy - clean) * torch.tensor(STD).view(1, -1, 1, 1)


def test_clean_and_noisy_views_share_the_augmentation_and_differ_by_the_noise() -> None:
    batch = augmented_batch()
    method = build(noise_std=0.05)
    student_seen, teacher_seen = stem_inputs(method.student), stem_inputs(method.teacher.network)
    method.training_step(batch)
    assert torch.equal(teacher_seen[0], batch.inputs)  # the teacher sees the clean augmented batch itself
    difference = pixel_difference(student_seen[0], batch.inputs)
    # A different crop or flip would differ by whole pixel values; only sigma-sized noise is left.
    assert difference.std().item() == pytest.approx(0.05, rel=0.05) and abs(difference.mean().item()) < 0.005
    for channel in range(3):
        assert difference[:, channel].std().item() == pytest.approx(0.05, rel=0.1)

    without_noise = build(noise_std=0.0)
    student_seen, teacher_seen = stem_inputs(without_noise.student), stem_inputs(without_noise.teacher.network)
    without_noise.training_step(batch)
    assert torch.equal(student_seen[0], teacher_seen[0])


def test_teacher_gradients_are_never_computed() -> None:
    method = build(kd_weight=0.5)
    teacher = method.teacher.network.requires_grad_(True)  # even unfrozen, the source runs it without a graph
    statistics = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    output = method.training_step(augmented_batch())
    assert set(output.losses) == {"ce", "mimic1", "mimic2", "mimic3", "kd"}
    sum(output.losses.values()).backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in teacher.named_buffers())
    assert all(parameter.grad is not None for parameter in method.student.parameters())
    # Equal widths (both 16-16-32-64): identity connectors, nothing extra to train.
    assert sum(parameter.numel() for parameter in method.connectors.parameters()) == 0


def test_zero_lambda_is_the_noisy_baseline_without_a_teacher_forward() -> None:
    method = build(feature_weight=0.0)
    teacher_seen = stem_inputs(method.teacher.network)
    output = method.training_step(augmented_batch())
    assert set(output.losses) == {"ce"} and teacher_seen == []
    per_layer = build(feature_weight=[0.0, 2.0, 0.0])
    assert set(per_layer.training_step(augmented_batch()).losses) == {"ce", "mimic2"}


@pytest.mark.parametrize(("student", "teacher"), [("test_efficientnet", "cifar_resnet8"), ("cifar_resnet8", "test_efficientnet")])
def test_connectors_map_student_channels_to_teacher_channels(student: str, teacher: str) -> None:
    method = build(student, teacher, layers=[1, 2, -1], teacher_layers=[1, 2, 3])
    student_info, teacher_info = method.student.feature_info, method.teacher.network.feature_info
    for connector, student_index, teacher_index in zip(method.connectors, [1, 2, len(student_info) - 1], [1, 2, 3]):
        in_chs, out_chs = student_info[student_index]["num_chs"], teacher_info[teacher_index]["num_chs"]
        if in_chs == out_chs:
            assert isinstance(connector.project, nn.Identity)
        else:
            assert connector.project.weight.shape == (out_chs, in_chs, 1, 1)
        side = min(-(-16 // info["reduction"]) for info in (student_info[student_index], teacher_info[teacher_index]))
        assert connector.size == (side, side)
    output = method.training_step(augmented_batch())
    sum(output.losses.values()).backward()
    assert all(torch.isfinite(value) for value in output.losses.values())
    assert all(parameter.grad is not None for parameter in method.connectors.parameters())


def test_layer_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="stage indices 0..3"):
        build(layers=[4])
    with pytest.raises(UsageError, match="once"):
        build(layers=[3, -1])
    with pytest.raises(ValueError, match="one entry per layer"):
        FeatureMimicParams(layers=[1, 2], teacher_layers=[3])


def test_noisy_validation_is_the_same_every_epoch() -> None:
    method = build(noise_std=0.1)
    clean = augmented_batch().inputs
    method.on_epoch_start(1)
    first = method.eval_inputs(clean)
    method.training_step(augmented_batch())  # training draws from the global generator, not the validation one
    method.on_epoch_start(2)
    assert torch.equal(method.eval_inputs(clean), first)
    assert pixel_difference(first, clean).std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("name", ["cifar_wrn_16_1", "test_efficientnet", "test_vit"])
def test_logits_and_features_come_from_one_forward(name: str) -> None:
    model = create_model(name, num_classes=10, input_size=INPUT_SIZE).eval()
    inputs = torch.randn(2, *INPUT_SIZE)
    with torch.no_grad():
        logits, features = logits_and_features(model, inputs, [2, 1])
        expected = model.forward_intermediates(inputs, indices=[1, 2], intermediates_only=True)
        assert torch.allclose(logits, model(inputs), atol=1e-6)
        assert all(torch.equal(feature, reference) for feature, reference in zip(features, expected))


def connector_method() -> FeatureMimic:
    """Different widths on both sides (cifar_resnet8 vs test_efficientnet): real 1x1-conv connectors."""
    return build("cifar_resnet8", "test_efficientnet", layers=[1, 2], teacher_layers=[1, 2], kd_weight=0.5)


def test_the_trainable_module_under_torch_compile_does_not_recompile() -> None:
    method = connector_method()
    task = TrainableModule(method)
    method.use_student_forward(torch.compile(task, backend="eager"))  # dynamo's guards, without inductor's compile time
    batch = augmented_batch()
    method.training_step(batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            output = method.training_step(batch)
            sum(output.losses.values()).backward()
    assert set(output.losses) == {"ce", "mimic1", "mimic2", "kd"}
    assert all(parameter.grad is not None for parameter in task.extras.parameters())


def test_one_ddp_wrapper_syncs_student_and_connectors(tmp_path: Path) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        method = connector_method()
        task = TrainableModule(method)
        # The student's forward runs inside DDP, the connectors on its outputs: the backward reaches both.
        method.use_student_forward(nn.parallel.DistributedDataParallel(task))
        for _ in range(2):  # a second step fails if the reducer did not see every gradient of the first
            task.zero_grad()
            output = method.training_step(augmented_batch())
            sum(output.losses.values()).backward()
        connectors = list(task.extras.parameters())
        assert connectors and all(parameter.grad is not None for parameter in [*connectors, *task.student.parameters()])
    finally:
        dist.destroy_process_group()


def noisy_val_accuracy(checkpoint: Path, sigma: float) -> float:
    """What the engine's validation computes with feature-mimic's eval_inputs: one batch, generator seeded 0."""
    model, info = model_from_checkpoint(checkpoint)
    data_config = DataConfig.model_validate(info.data)
    split = evaluation_split(load_data(data_config), data_config, "val")
    noisy = PixelNoise(sigma=sigma)(normalize(split.images, info.mean, info.std), info.mean, info.std, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(noisy).argmax(dim=1).eq(split.targets).float().mean().item()


def test_distill_keeps_the_best_noisy_val_checkpoint_and_deploys_plain_timm(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    sigma = 0.3
    result = run_cli(
        "distill", "--method", "feature-mimic", "--teacher", teacher_run / "last.safetensors", "--model", "test_efficientnet",
        "--epochs", 3, "--set", f"method.noise_std={sigma}", "--set", "method.layers=[1,2,3]",
        "--set", "train.early_stop_patience=1", "--set", "teacher_min_top1=1.0", "--out", out, "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["loss"]) == {"ce", "mimic1", "mimic2", "mimic3", "total"}
    best = max(records, key=lambda record: record["val_top1"])  # first epoch wins ties, as in the engine
    assert summary["best_epoch"] == best["epoch"] == read_checkpoint_info(out / "best.safetensors").epoch

    # The recorded val top-1 is the best checkpoint's accuracy on the fixed noisy copy of the val split.
    assert best["val_top1"] == pytest.approx(noisy_val_accuracy(out / "best.safetensors", sigma), abs=1e-6)

    # Failure factor 2 made visible: the teacher's clean accuracy, and a warning when it is weak.
    teacher_val = run_cli("eval", teacher_run / "last.safetensors", "--split", "val", "--json").json()["metrics"]["top1"]
    assert summary["teacher_clean"]["split"] == "val"
    assert summary["teacher_clean"]["top1"] == pytest.approx(teacher_val)
    assert "warning: the teacher's clean val top-1" in result.stderr

    # Connectors live in the resume state only; the deployable checkpoint is a plain timm test_efficientnet.
    method_state = load_state(out / "resume.safetensors")["method"]  # the method module's state_dict()
    assert method_state["connectors.0.project.weight"].shape == (16, 24, 1, 1)
    plain = timm.create_model("test_efficientnet", num_classes=10)
    plain.load_state_dict(safetensors.torch.load_file(out / "last.safetensors"))  # strict: no connector keys
