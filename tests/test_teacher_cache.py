"""--cache-teacher: stored teacher logits equal recomputed ones, across epochs and runs, and only logits are served.

The cache is a teacher source: a method asks it per batch, and only training batches (which name their epoch) are served from the table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from conftest import TINY, run_cli
from kdcli.data.augment import BatchAugment, EpochAugmentation
from kdcli.data.bundle import ImageSplit
from kdcli.method import Batch
from kdcli import teacher_cache
from kdcli.config import build_config
from kdcli.jobs.build import resolve_run, teacher_codec
from kdcli.losses import distillation_kl
from kdcli.teacher_cache import (
    CachedTeacher,
    FullLogits,
    HalfLogits,
    Int8Logits,
    TeacherCacheError,
    TopKLogits,
    cache_key,
    cache_path,
    table_bytes,
)

NUM_SAMPLES = 50
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CROP_FLIP = BatchAugment(MEAN, STD, crop_padding=2, hflip=True)
NO_RANDOMNESS = BatchAugment(MEAN, STD, crop_padding=0, hflip=False)


def small_teacher() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return model.eval().requires_grad_(False)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(256, (NUM_SAMPLES, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def teacher_path(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"stands in for a checkpoint: only its bytes are hashed")
    return path


def new_cache(teacher: nn.Module, teacher_path: Path, *, per_epoch: bool) -> CachedTeacher:
    return CachedTeacher(teacher, teacher_path=teacher_path, key="0123abcd", num_samples=NUM_SAMPLES, per_epoch=per_epoch)


def train_epoch(cache: CachedTeacher, images: torch.Tensor, augment: BatchAugment, epoch: int, batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, int]]:
    """What the engine and a method do with the teacher source; returns (inputs, served logits) per batch."""
    cache.on_epoch_start(epoch)
    views = EpochAugmentation(augment, NUM_SAMPLES, seed=epoch, device=torch.device("cpu"))
    order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(batch_size + epoch))
    served = []
    for index in order.split(batch_size):
        batch = Batch(views(images[index], index), torch.zeros(len(index), dtype=torch.int64), index, epoch)
        served.append((batch.inputs, cache.logits(batch)))
    stats = cache.on_epoch_end(epoch)
    assert stats.pop("table_bytes") > 0
    return served, stats


def assert_equals_recomputed(teacher: nn.Module, served: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for inputs, logits in served:
            torch.testing.assert_close(logits, teacher(inputs), rtol=1e-5, atol=1e-6)


def test_per_epoch_tables_are_reused_by_a_later_run(images: torch.Tensor, teacher_path: Path) -> None:
    teacher = small_teacher()
    first = new_cache(teacher, teacher_path, per_epoch=True)
    for epoch in (1, 2):
        served, stats = train_epoch(first, images, CROP_FLIP, epoch, batch_size=16)
        assert stats == {"hits": 0, "computed": NUM_SAMPLES}
        assert cache_path(teacher_path, "0123abcd", epoch).is_file()
    # A later run: other batch size and order, same (seed, epoch) views -> every logit from the tables.
    later = new_cache(teacher, teacher_path, per_epoch=True)
    for epoch in (1, 2):
        served, stats = train_epoch(later, images, CROP_FLIP, epoch, batch_size=7)
        assert stats == {"hits": NUM_SAMPLES, "computed": 0}
        assert_equals_recomputed(teacher, served)
    _, stats = train_epoch(later, images, CROP_FLIP, 3, batch_size=7)
    assert stats == {"hits": 0, "computed": NUM_SAMPLES}  # an epoch no run has seen yet


def test_one_table_without_augmentation(images: torch.Tensor, teacher_path: Path) -> None:
    teacher = small_teacher()
    cache = new_cache(teacher, teacher_path, per_epoch=False)
    assert train_epoch(cache, images, NO_RANDOMNESS, 1, batch_size=16)[1] == {"hits": 0, "computed": NUM_SAMPLES}
    served, stats = train_epoch(cache, images, NO_RANDOMNESS, 2, batch_size=9)
    assert stats == {"hits": NUM_SAMPLES, "computed": 0}
    assert_equals_recomputed(teacher, served)
    assert [path.name for path in (teacher_path.parent / "teacher-cache").iterdir()] == ["teacher.0123abcd.safetensors"]
    served, stats = train_epoch(new_cache(teacher, teacher_path, per_epoch=False), images, NO_RANDOMNESS, 5, batch_size=50)
    assert stats == {"hits": NUM_SAMPLES, "computed": 0}
    assert_equals_recomputed(teacher, served)


def test_batches_that_are_not_training_views_run_the_real_teacher(images: torch.Tensor, teacher_path: Path) -> None:
    teacher = small_teacher()
    cache = new_cache(teacher, teacher_path, per_epoch=False)
    train_epoch(cache, images, NO_RANDOMNESS, 1, batch_size=NUM_SAMPLES)  # fills the table
    cache.on_epoch_start(2)
    index = torch.arange(10)
    batch = Batch(NO_RANDOMNESS(images[index]), torch.zeros(10, dtype=torch.int64), index, epoch=2)
    with torch.no_grad():
        noisy = Batch(batch.inputs + 0.5, batch.targets, index)  # a method's own view of the batch
        torch.testing.assert_close(cache.logits(noisy), teacher(noisy.inputs))
        torch.testing.assert_close(cache.logits(batch), teacher(batch.inputs), rtol=1e-5, atol=1e-6)  # from the table
        split_pass = Batch(batch.inputs, batch.targets, index)  # a method's pass over a split: no epoch
        torch.testing.assert_close(cache.logits(split_pass), teacher(batch.inputs))
    assert cache.on_epoch_end(2) == {"hits": 10, "computed": 0, "table_bytes": NUM_SAMPLES * 5 * 4}  # only the training batch was served


def test_more_than_logits_is_a_clear_error(teacher_path: Path) -> None:
    cache = new_cache(small_teacher(), teacher_path, per_epoch=False)
    inputs = torch.zeros(2, 3, 8, 8)
    for ask in (lambda: cache.features(inputs, [0]), lambda: cache.logits_and_features(inputs, [0]), lambda: cache.feature_shapes((3, 8, 8))):
        with pytest.raises(TeacherCacheError, match="reads the teacher's features.*keeps only the teacher's logits"):
            ask()


def test_key_changes_with_what_the_logits_depend_on(images: torch.Tensor, teacher_path: Path) -> None:
    split = ImageSplit(images, torch.zeros(NUM_SAMPLES, dtype=torch.int64))
    key = cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="None")
    assert key == cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="None")
    others = [
        cache_key(teacher_path, split, CROP_FLIP, seed=1, precision="None"),
        cache_key(teacher_path, split, BatchAugment(MEAN, STD, crop_padding=3, hflip=True), seed=0, precision="None"),
        cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="torch.bfloat16"),
        cache_key(teacher_path, split.subset(torch.arange(NUM_SAMPLES - 1)), CROP_FLIP, seed=0, precision="None"),
    ]
    assert key not in others and len(set(others)) == len(others)
    # Without random augmentation the seed does not matter.
    assert cache_key(teacher_path, split, NO_RANDOMNESS, seed=0, precision="None") == cache_key(teacher_path, split, NO_RANDOMNESS, seed=5, precision="None")
    teacher_path.write_bytes(b"retrained")
    assert cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="None") != key


def test_distill_cache_teacher_replays_a_run_exactly(teacher_run: Path, tmp_path: Path) -> None:
    """A second run reads every teacher logit from the first run's tables and ends at the same weights."""
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "last.safetensors", teacher)
    args = ["--teacher", teacher, "--cache-teacher", "--epochs", 2, "--set", "train.deterministic=true",
            "--set", "data.crop_padding=2", "--set", "data.hflip=true", *TINY]
    for name in ("first", "second"):
        result = run_cli("distill", *args, "--out", tmp_path / name)
        assert result.exit_code == 0, result
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("first", "second")}
    assert all(record["teacher_cache"]["hits"] == 0 for record in records["first"])
    assert all(record["teacher_cache"]["computed"] == 0 and record["teacher_cache"]["hits"] > 0 for record in records["second"])
    assert len(list((tmp_path / "teacher-cache").glob("teacher.*.epoch000[12].safetensors"))) == 2
    first = safetensors.torch.load_file(tmp_path / "first" / "last.safetensors")
    second = safetensors.torch.load_file(tmp_path / "second" / "last.safetensors")
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_cache_teacher_needs_a_teacher(tmp_path: Path) -> None:
    result = run_cli("distill", "--method", "standard", "--cache-teacher", "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "--teacher" in result.stderr and "Traceback" not in result.stderr


# --- top-k tables --------------------------------------------------------------------------------------


def test_top_k_keeps_the_top_probabilities_and_the_remaining_mass() -> None:
    logits = 3 * torch.randn(32, 40, generator=torch.Generator().manual_seed(0))
    codec = TopKLogits(5)
    decoded = codec.decode(codec.encode(logits), 40)
    probs, approximate = logits.softmax(dim=1), decoded.softmax(dim=1)
    top = logits.topk(5, dim=1).indices
    torch.testing.assert_close(approximate.gather(1, top), probs.gather(1, top))  # exact at temperature 1
    others = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top, False)
    tail = approximate[others].view(32, 35)
    torch.testing.assert_close(tail, tail[:, :1].expand(32, 35))  # the rest of the mass, spread evenly
    torch.testing.assert_close(decoded.argmax(dim=1), logits.argmax(dim=1))
    assert torch.equal(TopKLogits(40).decode(TopKLogits(40).encode(logits), 40), logits)  # k = C: exact
    assert table_bytes(codec.encode(logits)) == 32 * (5 * 4 + 5 * 4 + 4)


def test_top_k_tables_fill_and_replay(images: torch.Tensor, teacher_path: Path) -> None:
    teacher, codec = small_teacher(), TopKLogits(2)
    new = lambda: CachedTeacher(teacher, teacher_path=teacher_path, key="topk", num_samples=NUM_SAMPLES, per_epoch=True, codec=codec)  # noqa: E731
    cache = new()
    served, stats = train_epoch(cache, images, CROP_FLIP, 1, batch_size=16)
    assert stats == {"hits": 0, "computed": NUM_SAMPLES}
    assert cache.on_epoch_end(1)["table_bytes"] == NUM_SAMPLES * (2 * 4 + 2 * 4 + 4)  # values, classes, log-partition
    replayed, stats = train_epoch(new(), images, CROP_FLIP, 1, batch_size=7)
    assert stats["hits"] == NUM_SAMPLES and stats["computed"] == 0
    with torch.no_grad():
        for inputs, logits in replayed:
            torch.testing.assert_close(logits, codec.decode(codec.encode(teacher(inputs)), 5), rtol=1e-5, atol=1e-5)


def test_distill_with_a_top_k_cache(teacher_run: Path, tmp_path: Path) -> None:
    """A top-k run beside a full-logit table of the same teacher fills its own table, then replays it."""
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "last.safetensors", teacher)
    full = ["--teacher", teacher, "--cache-teacher", "--epochs", 1, *TINY]
    assert run_cli("distill", *full, "--out", tmp_path / "full").exit_code == 0
    args = [*full, "--set", "train.cache_teacher_topk=3"]
    for name in ("first", "second"):
        assert run_cli("distill", *args, "--out", tmp_path / name).exit_code == 0
    last_cache_record = lambda name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["teacher_cache"]  # noqa: E731
    assert last_cache_record("first")["hits"] == 0  # the full table is not read as a top-k one
    assert len(list((tmp_path / "teacher-cache").glob("teacher.*.safetensors"))) == 2  # one table per codec
    replayed = last_cache_record("second")
    assert replayed["computed"] == 0 and replayed["hits"] > 0
    assert 0 < replayed["table_bytes"] < 480 * 10 * 4  # below the full table's 4 bytes x 10 classes a sample
    refused = run_cli("distill", "--teacher", teacher, "--set", "train.cache_teacher_topk=3", "--out", tmp_path / "no", *TINY)
    assert refused.exit_code == 2 and "--cache-teacher" in refused.stderr and not (tmp_path / "no").exists()


# --- exact tails and compact codecs at 1000 classes ---------------------------------------------------

IMAGENET_CLASSES = 1000


def confident_logits(margin: float, samples: int = 64) -> torch.Tensor:
    """A 1000-class teacher whose class 0 leads the runner-up by ``margin``, over a spread-out background."""
    generator = torch.Generator().manual_seed(int(margin))
    logits = (1 + 2 * torch.rand(samples, 1, generator=generator)) * torch.randn(samples, IMAGENET_CLASSES, generator=generator)
    logits[:, 0] = logits[:, 1:].amax(dim=1) + margin
    return logits


def tempered_tail_mass(logits: torch.Tensor, top: torch.Tensor, temperature: float) -> torch.Tensor:
    tempered = logits.double() / temperature
    return (tempered.scatter(1, top, -float("inf")).logsumexp(dim=1) - tempered.logsumexp(dim=1)).exp()


@pytest.mark.parametrize("margin", [0.0, 20.0, 40.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_top_k_keeps_the_tail_mass_exact_whatever_the_margin(margin: float, temperature: float) -> None:
    """At margin 40 the tail holds ~1e-17 of the mass: 1 - sum(top-k) in fp32 would give 0; the stored log-sum-exp keeps it."""
    logits = confident_logits(margin)
    codec = TopKLogits(5, temperature)
    decoded = codec.decode(codec.encode(logits), IMAGENET_CLASSES)
    top = logits.topk(5, dim=1).indices
    truth = tempered_tail_mass(logits, top, temperature)
    assert truth.min() > 0
    torch.testing.assert_close(tempered_tail_mass(decoded, top, temperature), truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(decoded.gather(1, top), logits.gather(1, top), rtol=0, atol=0)  # the top k as they were


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_top_k_table_of_every_class_gives_exactly_the_uncached_loss(temperature: float) -> None:
    logits = confident_logits(20.0)
    student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    codec = TopKLogits(IMAGENET_CLASSES, temperature)
    decoded = codec.decode(codec.encode(logits), IMAGENET_CLASSES)
    assert torch.equal(distillation_kl(student, decoded, temperature), distillation_kl(student, logits, temperature))


def test_fp16_and_int8_keep_every_logit_within_their_step() -> None:
    logits = confident_logits(20.0)
    centered = logits - logits.amax(dim=1, keepdim=True)
    fp16, int8 = HalfLogits(), Int8Logits()
    half = fp16.decode(fp16.encode(logits), IMAGENET_CLASSES)
    torch.testing.assert_close(half, logits, rtol=0, atol=float(centered.abs().max()) * 2**-11 + 1e-5)
    assert torch.equal(half.argmax(dim=1), logits.argmax(dim=1))
    step = (logits.amax(dim=1) - logits.amin(dim=1)) / 255
    quantized = int8.decode(int8.encode(logits), IMAGENET_CLASSES)
    assert ((quantized - logits).abs() <= step.unsqueeze(1) / 2 + 1e-5).all()
    assert torch.equal(quantized.argmax(dim=1), logits.argmax(dim=1))
    sizes = [table_bytes(codec.encode(logits)) // len(logits) for codec in (FullLogits(), fp16, int8)]
    assert sizes == [4000, 2004, 1008]


def test_key_names_the_codec_and_the_format(images: torch.Tensor, teacher_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables of different codecs (or a top-k table for another temperature) never share a file; old formats are not read."""
    split = ImageSplit(images, torch.zeros(NUM_SAMPLES, dtype=torch.int64))
    codecs = [FullLogits(), HalfLogits(), Int8Logits(), TopKLogits(5), TopKLogits(5, 4.0), TopKLogits(10, 4.0)]
    keys = {cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="None", codec=codec) for codec in codecs}
    assert len(keys) == len(codecs)
    monkeypatch.setattr(teacher_cache, "CACHE_FORMAT", 2)
    assert cache_key(teacher_path, split, CROP_FLIP, seed=0, precision="None", codec=TopKLogits(5)) not in keys


def run_codec(*overrides: str) -> object:
    config = build_config(overrides=["job=distill", "teacher=t.safetensors", "model.name=cifar_resnet8", *overrides])
    return teacher_codec(resolve_run(config).config)


def test_the_run_chooses_the_codec_and_the_top_k_temperature() -> None:
    assert run_codec("train.cache_teacher=true", "method.name=kd") == HalfLogits()  # the default
    assert run_codec("train.cache_teacher=true", "method.name=kd", "train.cache_teacher_codec=int8") == Int8Logits()
    assert run_codec("train.cache_teacher=true", "method.name=kd", "train.cache_teacher_topk=5") == TopKLogits(5, 4.0)  # kd's tau
    assert run_codec("train.cache_teacher=true", "method.name=kd", "method.temperature=2", "train.cache_teacher_topk=5") == TopKLogits(5, 2.0)
    overridden = ("train.cache_teacher=true", "train.cache_teacher_topk=5", "train.cache_teacher_temperature=3")
    assert run_codec(*overridden) == TopKLogits(5, 3.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.cache_teacher_codec=int8"], "add --cache-teacher"),
        (["train.cache_teacher=true", "train.cache_teacher_codec=int8", "train.cache_teacher_topk=5"], "drop train.cache_teacher_codec"),
        (["train.cache_teacher=true", "train.cache_teacher_temperature=2"], "add train.cache_teacher_topk"),
        (["train.cache_teacher=true", "train.cache_teacher_codec=bf16"], "cache_teacher_codec"),
    ],
)
def test_cache_settings_that_contradict_are_one_line_errors(overrides: list[str], message: str, teacher_run: Path, tmp_path: Path) -> None:
    teacher = teacher_run / "last.safetensors"
    result = run_cli("distill", "--teacher", teacher, *[arg for item in overrides for arg in ("--set", item)], "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
