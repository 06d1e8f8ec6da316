"""``kdcli convert``: .pth files written here, read with weights_only, checked, written as kdcli checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY, run_cli
from kdcli.checkpoint import read_checkpoint_info
from kdcli.jobs.common import model_from_checkpoint
import kdcli.models.cifar_resnet  # noqa: F401  (registers the cifar_* zoo in timm)
from kdcli.models._cifar_common import CIFAR100_MEAN, CIFAR100_STD
from test_bad_input import assert_clean_error


def trained_looking_model(arch: str, num_classes: int) -> torch.nn.Module:
    """A model whose batch-norm statistics differ from a fresh one, so a lost buffer would show."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_repdistiller_style(model: torch.nn.Module, path: Path, prefix: str = "module.") -> None:
    """RepDistiller's layout: {"epoch", "model": state_dict, "accuracy", "optimizer"}, here from DataParallel."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {f"{prefix}{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(79.42), "optimizer": optimizer.state_dict()}, path)


@pytest.fixture(scope="module")
def resnet8_cifar100(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    path = tmp_path_factory.mktemp("pth") / "ckpt_epoch_240.pth"
    model = trained_looking_model("cifar_resnet8", 100)
    save_repdistiller_style(model, path)
    return model, path


def test_repdistiller_teacher_round_trips(resnet8_cifar100: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    original, source = resnet8_cifar100
    output = tmp_path / "teacher.safetensors"
    result = run_cli("convert", source, "--arch", "cifar_resnet8", "-o", output, "--json")
    assert result.exit_code == 0, result
    report = result.json()
    assert (report["key"], report["renamed"], report["num_classes"], report["data"]) == ("model", {"module.": ""}, 100, "cifar100")

    info = read_checkpoint_info(output)
    assert (info.arch, info.num_classes, info.input_size, info.epoch, info.method) == ("cifar_resnet8", 100, (3, 32, 32), 240, "imported")
    assert info.mean == pytest.approx(CIFAR100_MEAN) and info.std == pytest.approx(CIFAR100_STD)
    weights = safetensors.torch.load_file(output)
    expected = original.state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[name], expected[name]) for name in expected)
    rebuilt, _ = model_from_checkpoint(output)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), original(images))


def test_converted_teacher_distills_on_its_data(tmp_path: Path) -> None:
    source = tmp_path / "plain.pth"
    torch.save(trained_looking_model("cifar_resnet8", 10).state_dict(), source)  # a bare state_dict
    output = tmp_path / "teacher.safetensors"
    result = run_cli("convert", source, "--arch", "cifar_resnet8", "--data", "synthetic", "-o", output, "--json")
    assert result.exit_code == 0, result
    info = read_checkpoint_info(output)
    assert (info.input_size, info.data["name"], info.epoch, result.json()["key"]) == ((3, 16, 16), "synthetic", 0, "")
    student = run_cli("distill", "--teacher", output, "--epochs", 1, "--out", tmp_path / "student", "--json", *TINY)
    assert student.exit_code == 0, student
    assert student.json()["teacher_arch"] == "cifar_resnet8"


def test_explicit_input_spec_and_renamed_prefixes(tmp_path: Path) -> None:
    model = trained_looking_model("cifar_resnet8", 7)
    source = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"backbone.{name}": tensor for name, tensor in model.state_dict().items()}}, source)
    output = tmp_path / "out.safetensors"
    common = ["--arch", "cifar_resnet8", "-o", output, "--input-size", "3,24,24", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    assert_clean_error(run_cli("convert", source, *common), 1, "does not fit cifar_resnet8", "missing", "unexpected", "--rename")
    result = run_cli("convert", source, *common, "--rename", "backbone.=")
    assert result.exit_code == 0, result
    info = read_checkpoint_info(output)
    assert (info.num_classes, info.input_size, info.mean, info.std, info.data) == (7, (3, 24, 24), (0.5,) * 3, (0.25,) * 3, {})
    assert_clean_error(run_cli("convert", source, *common, "--rename", "backbone.="), 2, "exists", "--overwrite")
    assert_clean_error(run_cli("convert", source, *common, "--rename", "backbone.=", "--overwrite", "--num-classes", "9"), 2, "has 7 rows")
    assert_clean_error(run_cli("convert", source, *common[:-2], "--std", "0.25", "--rename", "backbone.=", "--overwrite"), 2, "one value per input channel")


class RunsCodeWhenUnpickled:
    """What a hostile checkpoint looks like: unpickling it calls open(marker, "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_files_that_need_full_unpickling_are_refused(resnet8_cifar100: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    original, _ = resnet8_cifar100
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": original.state_dict(), "extra": RunsCodeWhenUnpickled(marker)}, hostile)
    output = tmp_path / "out.safetensors"
    result = run_cli("convert", hostile, "--arch", "cifar_resnet8", "-o", output)
    assert_clean_error(result, 1, "pickled Python object (io.open)", "full unpickling", "model.state_dict()")
    assert not marker.exists() and not output.exists()

    whole = tmp_path / "whole.pth"
    torch.save(original, whole)
    assert_clean_error(run_cli("convert", whole, "--arch", "cifar_resnet8", "-o", output), 1, "whole pickled model object")
    assert not output.exists()


def test_weights_that_do_not_fit_are_refused(resnet8_cifar100: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, source = resnet8_cifar100
    output = tmp_path / "out.safetensors"
    # Same parameter names, four times the width: every shape is checked, not only the names.
    assert_clean_error(run_cli("convert", source, "--arch", "cifar_resnet8x4", "-o", output), 1, "shape (file vs model)", "conv1.weight [16, 3, 3, 3] vs [32, 3, 3, 3]")
    assert_clean_error(run_cli("convert", source, "--arch", "cifar_resnet14", "-o", output), 1, "missing", "layer1.1.conv1.weight")
    assert_clean_error(run_cli("convert", source, "--arch", "cifar_resnet9", "-o", output), 2, "unknown model", "did you mean")
    assert not output.exists()


def test_unreadable_and_unusual_files(tmp_path: Path) -> None:
    output = tmp_path / "out.safetensors"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert_clean_error(run_cli("convert", garbage, "--arch", "cifar_resnet8", "-o", output), 1, "not a readable PyTorch file")
    assert_clean_error(run_cli("convert", tmp_path / "none.pth", "--arch", "cifar_resnet8", "-o", output), 1, "file not found")
    no_weights = tmp_path / "no_weights.pth"
    torch.save({"epoch": 3, "history": [0.1, 0.2]}, no_weights)
    assert_clean_error(run_cli("convert", no_weights, "--arch", "cifar_resnet8", "-o", output), 2, "no state_dict", "epoch, history", "--key")
    assert_clean_error(run_cli("convert", no_weights, "--arch", "cifar_resnet8", "-o", tmp_path / "out.pth"), 2, ".safetensors")
