"""Mixup / CutMix of training batches: soft targets, opt-in methods, both data paths, exact resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import interrupted_and_resumed, run_cli
from kdcli.data.mixing import BatchMixing
from test_streaming import write_folder

TINY_MIX = ["--set", "data.synthetic.num_train=300", "--set", "data.synthetic.num_test=100", "--batch-size", "50", "-q"]
MIXUP = ["--set", "data.mixup_alpha=0.4"]
CUTMIX = ["--set", "data.cutmix_alpha=1.0"]


def final_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]["total"]


def one_error_line(result: object, exit_code: int, text: str) -> None:
    assert result.exit_code == exit_code, result  # type: ignore[attr-defined]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kdcli: error: ") and text in result.stderr, result  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def mixed_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch teacher trained with Mixup and CutMix (each batch gets one of the two)."""
    out = tmp_path_factory.mktemp("mixing") / "teacher"
    result = run_cli("teach", "--epochs", 1, "--out", out, *TINY_MIX, *MIXUP, *CUTMIX)
    assert result.exit_code == 0, result
    return out


def test_a_mixed_batch_has_probability_targets_drawn_from_its_seed_alone() -> None:
    inputs = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 5
    for alphas in ({"mixup_alpha": 0.4, "cutmix_alpha": 0.0}, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}):
        mixing = BatchMixing(**alphas, mix_prob=1.0, num_classes=5)
        before = torch.random.get_rng_state()
        mixed, targets = mixing(inputs, labels, seed=7)
        assert torch.equal(torch.random.get_rng_state(), before)  # the methods' random stream is untouched
        assert targets.shape == (8, 5) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        assert ((targets > 0) & (targets < 1)).any() and not torch.equal(mixed, inputs)
        again = mixing(inputs, labels, seed=7)
        assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    unmixed, one_hot = BatchMixing(mixup_alpha=0.4, cutmix_alpha=0.0, mix_prob=0.0, num_classes=5)(inputs, labels, seed=7)
    assert torch.equal(unmixed, inputs) and torch.equal(one_hot, torch.nn.functional.one_hot(labels, 5).float())


def test_teach_and_distill_train_on_mixed_batches(mixed_teacher: Path, tmp_path: Path) -> None:
    assert run_cli("teach", "--epochs", 1, "--out", tmp_path / "plain-teacher", *TINY_MIX).exit_code == 0
    assert final_loss(mixed_teacher) != final_loss(tmp_path / "plain-teacher")
    record = json.loads((mixed_teacher / "metrics.jsonl").read_text())
    assert 0.0 <= record["train_top1"] <= 1.0  # counted against the dominant class of each mixed target
    teacher = mixed_teacher / "last.safetensors"
    for name, mixing in (("mixed", CUTMIX), ("plain", [])):
        result = run_cli("distill", "--teacher", teacher, "--epochs", 1, "--out", tmp_path / name, *TINY_MIX, *mixing)
        assert result.exit_code == 0, result
    assert final_loss(tmp_path / "mixed") != final_loss(tmp_path / "plain")


def test_a_student_does_not_inherit_its_teachers_mixing(mixed_teacher: Path, tmp_path: Path) -> None:
    result = run_cli("distill", "--teacher", mixed_teacher / "last.safetensors", "--method", "adaptive-fusion", "--dry-run", "--out", tmp_path / "s")
    assert result.exit_code == 0, result
    data = result.json()["config"]["data"]
    assert data["mixup_alpha"] == 0 and data["cutmix_alpha"] == 0 and data["synthetic"]["num_train"] == 300


def test_mixing_on_the_streaming_path(tmp_path: Path) -> None:
    photos = write_folder(tmp_path / "photos", per_class=6, corrupt=False)
    args = ["--data", f"imagefolder:{photos}", "--set", "data.in_memory=false", "--set", "data.image_size=24", "--set", "data.workers=0",
            "--set", "data.val_split=0", "--batch-size", "6", "--model", "cifar_resnet8", "--epochs", 1, "-q"]
    for name, mixing in (("mixed", [*MIXUP, *CUTMIX]), ("plain", [])):
        result = run_cli("teach", *args, *mixing, "--out", tmp_path / name)
        assert result.exit_code == 0, result
    assert final_loss(tmp_path / "mixed") != final_loss(tmp_path / "plain")


def test_a_mixed_run_resumes_inside_an_epoch_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--epochs", 2, "--set", "train.deterministic=true", *TINY_MIX, *MIXUP, *CUTMIX, "--set", "data.mix_prob=0.7"]
    straight, resumed = interrupted_and_resumed(args, tmp_path, monkeypatch, interrupt_at=8, label="step 2/6 of epoch 2")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_mixing_is_refused_for_label_methods_and_with_a_teacher_cache(mixed_teacher: Path, tmp_path: Path) -> None:
    labels_only = run_cli("distill", "--method", "tfkd-virtual", "--out", tmp_path / "virtual", *TINY_MIX, *MIXUP)
    one_error_line(labels_only, 2, "method 'tfkd-virtual' needs class labels as targets")
    cached = run_cli("distill", "--teacher", mixed_teacher / "last.safetensors", "--cache-teacher", "--out", tmp_path / "cached", *TINY_MIX, *CUTMIX)
    one_error_line(cached, 2, "drop --cache-teacher or set data.mixup_alpha=0 and data.cutmix_alpha=0")
    bad_chance = run_cli("teach", "--out", tmp_path / "chance", *TINY_MIX, *MIXUP, "--set", "data.mix_prob=1.5")
    one_error_line(bad_chance, 2, "data.mix_prob")
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing staged
