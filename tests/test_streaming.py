"""The streaming path: real JPEG/PNG files of every mode and size, decoded in workers, replayable, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import interrupted_and_resumed, run_cli
from kdcli.checkpoint import read_state_label
from kdcli.data.bundle import ImageSplit
from kdcli.data.loading import training_epochs
from kdcli.data.recipes import TrainRecipe
from kdcli.data.stream import FileSplit, StreamingLoader
from kdcli.data.vision import IMAGENET_MEAN, IMAGENET_STD, load_imagefolder
from kdcli.config import build_config
from kdcli.jobs.build import resolve_run
from kdcli.errors import KdcliError
from test_distributed import worker_of_rank

CPU = torch.device("cpu")
SIZES = [(40, 30), (64, 80), (100, 50), (33, 33), (120, 90), (48, 64)]
MODES = [("RGB", "JPEG", ".jpg"), ("L", "JPEG", ".jpg"), ("CMYK", "JPEG", ".jpg"), ("RGBA", "PNG", ".png"), ("P", "PNG", ".png"), ("RGB", "PNG", ".png")]


def write_image(path: Path, size: tuple[int, int], mode: str, file_format: str, colour: int, seed: int) -> None:
    """A noisy image whose dominant channel is its class's: learnable, yet every file differs."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 90, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    pixels[..., colour] += 150
    image = Image.fromarray(pixels.numpy(), "RGB")
    image = image.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    image.save(path, file_format)


def write_folder(root: Path, per_class: int = 12, corrupt: bool = True) -> Path:
    for split, count in (("train", per_class), ("val", 4)):
        for colour, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                mode, file_format, suffix = MODES[number % len(MODES)]
                write_image(folder / f"{number}{suffix}", SIZES[number % len(SIZES)], mode, file_format, colour, seed=hash((split, name, number)) % 2**31)
    if corrupt:
        (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("photos"))


def test_every_mode_and_size_decodes_and_a_corrupt_file_is_counted(folder: Path) -> None:
    bundle = load_imagefolder(folder, image_size=24, in_memory=False, workers=0)
    assert isinstance(bundle.train, FileSplit) and len(bundle.train) == 37 and bundle.recipe is not None
    images, targets, index = next(iter(StreamingLoader(bundle.test, batch_size=12, shuffle=False, device=CPU)))
    assert images.shape == (12, 3, 24, 24) and images.dtype == torch.uint8 and torch.equal(index, torch.arange(12))
    epochs = training_epochs(bundle.train, bundle.recipe, batch_size=8, device=CPU, seed=0)
    seen = sum(len(batch_index) for _, _, batch_index in epochs.batches(1, 0))
    assert seen == 36 and epochs.epoch_stats() == {"corrupt_skipped": 1}
    stopping = load_imagefolder(folder, image_size=24, in_memory=False, workers=0, on_corrupt="stop")
    with pytest.raises(KdcliError) as caught:
        list(training_epochs(stopping.train, stopping.recipe, batch_size=8, device=CPU, seed=0).batches(1, 0))
    assert "broken.jpg" in str(caught.value) and "\n" not in str(caught.value)


def views(split: FileSplit, epoch: int, *, workers: int, batch_size: int) -> dict[int, torch.Tensor]:
    recipe = TrainRecipe(24, IMAGENET_MEAN, IMAGENET_STD, auto_augment="trivial")
    loader = StreamingLoader(FileSplit(split.files, split.targets, split.view, workers), batch_size=batch_size, shuffle=True, device=CPU, recipe=recipe)
    loader.set_epoch(epoch)
    return {int(i): image for images, _, index in loader.iterate(0, skip_corrupt=True) for i, image in zip(index, images)}


def test_a_view_depends_on_seed_epoch_and_index_only(folder: Path) -> None:
    split = load_imagefolder(folder, image_size=24, in_memory=False, workers=0).train
    one = views(split, 1, workers=0, batch_size=4)
    other = views(split, 1, workers=2, batch_size=5)
    shared = one.keys() & other.keys()  # a last batch of one sample is dropped, so either may miss one
    assert len(shared) >= len(split) - 3 and all(torch.equal(one[i], other[i]) for i in shared)
    later = views(split, 2, workers=0, batch_size=4)
    assert sum(not torch.equal(one[i], later[i]) for i in one) > len(one) // 2  # a new epoch, new crops


def test_auto_streams_only_above_the_memory_budget(folder: Path) -> None:
    assert isinstance(load_imagefolder(folder, image_size=24, in_memory="auto").train, ImageSplit)
    assert isinstance(load_imagefolder(folder, image_size=24, in_memory="auto", memory_budget_gb=1e-6, on_corrupt="skip").train, FileSplit)


STREAMED = ["--data", None, "--set", "data.in_memory=false", "--set", "data.image_size=24", "--set", "data.workers=2",
            "--set", "data.val_split=0.2", "--set", "train.deterministic=true", "--batch-size", "8", "--model", "cifar_resnet8", "-q"]


def streamed(folder: Path, *extra: object) -> list[object]:
    return [str(folder) if value is None else value for value in STREAMED] + list(extra)


def test_teach_streamed_resumes_inside_an_epoch_exactly(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = streamed(f"imagefolder:{folder}", "--epochs", 2)
    straight, resumed = interrupted_and_resumed(args, tmp_path, monkeypatch, interrupt_at=6, label="step 2/4 of epoch 2")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    record = json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["data"] == {"corrupt_skipped": 1}


def test_distill_streamed_with_a_cached_teacher(folder: Path, tmp_path: Path) -> None:
    assert run_cli("teach", *streamed(f"imagefolder:{folder}", "--epochs", 1), "--out", tmp_path / "teacher").exit_code == 0
    args = streamed(f"imagefolder:{folder}", "--epochs", 2, "--teacher", tmp_path / "teacher" / "last.safetensors", "--cache-teacher")
    for name in ("first", "second"):
        assert run_cli("distill", *args, "--out", tmp_path / name).exit_code == 0
    records = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["teacher_cache"]["computed"] == 0 and record["teacher_cache"]["hits"] > 0 for record in records)
    first, second = (safetensors.torch.load_file(tmp_path / run / "last.safetensors") for run in ("first", "second"))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "examples" / "imagenet").glob("*.toml")), ids=lambda path: path.stem)
def test_imagenet_recipes_resolve(config: Path) -> None:
    job = "teach" if "soteacher" in config.stem else "distill"
    flags = {"job": job} if job == "teach" or "timm:" in config.read_text() else {"job": job, "teacher": "timm:resnet34.tv_in1k"}
    spec = resolve_run(build_config(file=config, flags=flags))
    assert spec.config.data.name.startswith("imagefolder:") and spec.model_name.startswith("resnet")


def test_two_processes_stream_the_views_one_process_streams(tmp_path: Path) -> None:
    """torchrun over the streaming path: each rank decodes its shard; test_vit (per-sample LayerNorm) ends where 1 process does."""
    clean = write_folder(tmp_path / "photos", per_class=16, corrupt=False)
    args = ["teach", "--data", f"imagefolder:{clean}", "--model", "test_vit", "--epochs", "2", "--lr", "0.01", "--batch-size", "8",
            "--set", "data.in_memory=false", "--set", "data.image_size=32", "--set", "data.workers=1", "--set", "train.deterministic=true",
            "--set", "data.val_split=0"]  # 48 samples: equal shards, no padding repeats
    runs = {}
    for processes in (2, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
        out = tmp_path / f"run{processes}"
        completed = subprocess.run([*launcher, "-m", "kdcli", *args, "--out", str(out), "-q"], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        runs[processes] = safetensors.torch.load_file(out / "last.safetensors")
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[2][key], value, rtol=1e-4, atol=1e-5, msg=key)


STREAMED_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcli"]


def streamed_teach_args(photos: Path) -> list[str]:
    """96 files over 2 ranks in batches of 4: 24 steps an epoch."""
    return ["teach", "--data", f"imagefolder:{photos}", "--model", "test_vit", "--epochs", "3", "--lr", "0.01", "--batch-size", "4",
            "--set", "data.in_memory=false", "--set", "data.image_size=32", "--set", "data.workers=1", "--set", "train.deterministic=true",
            "--set", "data.val_split=0", "-q"]


def stop_one_rank_when(run: Path, epochs_done: int, signum: int, args: list[str], env: dict[str, str]) -> str:
    """Start a 2-process streamed run, send ``signum`` to rank 1 once ``epochs_done`` epochs are logged; its stderr."""
    stopping = subprocess.Popen([*STREAMED_TORCHRUN, *args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= epochs_done) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(worker_of_rank(stopping, 1), signum)  # a preempted (SIGTERM) or crashed (SIGKILL) node: one rank
    stderr = stopping.communicate(timeout=240)[1]
    assert stopping.returncode != 0, stderr[-3000:]
    return stderr


def resume_and_compare(tmp_path: Path, env: dict[str, str]) -> None:
    """``--resume`` the stopped run; it must end with the uninterrupted run's weights and per-epoch losses."""
    resumed = subprocess.run([*STREAMED_TORCHRUN, "teach", "--resume", str(tmp_path / "stopped"), "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = [safetensors.torch.load_file(tmp_path / run / "last.safetensors") for run in ("straight", "stopped")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "stopped")]
    assert losses[0] == losses[1]


@pytest.fixture
def streamed_straight_run(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The uninterrupted 2-process streamed run under tmp_path/straight; the arguments and environment it ran with."""
    args = streamed_teach_args(write_folder(tmp_path / "photos", per_class=32, corrupt=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run([*STREAMED_TORCHRUN, *args, "--out", str(tmp_path / "straight")], capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    return args, env


def test_sigterm_on_one_rank_of_a_streamed_torchrun_resumes_exactly(streamed_straight_run: tuple[list[str], dict[str, str]], tmp_path: Path) -> None:
    """Preemption on the streaming path: one rank hears SIGTERM inside an epoch, every rank saves the same step
    (with its sampler position), and ``--resume`` reaches the weights of an uninterrupted 2-process run."""
    args, env = streamed_straight_run
    stderr = stop_one_rank_when(tmp_path / "stopped", 1, signal.SIGTERM, args, env)
    lines = [line for line in stderr.splitlines() if line.startswith("kdcli: error: ")]
    assert lines and all("terminated (SIGTERM): saved the exact training state after step" in line for line in lines), stderr[-3000:]
    label = read_state_label(tmp_path / "stopped" / "resume.safetensors")  # "step S/24 of epoch E"
    step, steps = (int(part) for part in label.split()[1].split("/"))
    # Ranks agree every 10 steps, and an epoch here takes a fraction of a second: the signal, sent as epoch 1 is
    # logged, may be agreed on at epoch 2's step 0 (its first agreement) as well as later; every one is an exact state.
    assert step % 10 == 0 and step < steps, label
    resume_and_compare(tmp_path, env)


def test_kill_9_of_one_rank_of_a_streamed_torchrun_resumes_from_the_last_saved_state(
    streamed_straight_run: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    """A crashed node (SIGKILL, nothing saved on the way out) in the middle of epoch 2: the other rank goes down
    with it, the epoch-1 state is whole, and ``--resume`` reaches the uninterrupted run's weights."""
    args, env = streamed_straight_run
    stop_one_rank_when(tmp_path / "stopped", 1, signal.SIGKILL, args, env)
    label = read_state_label(tmp_path / "stopped" / "resume.safetensors")
    assert "epoch 1" in label or "epoch 2" in label, label  # the last saved state: epoch 1's end, or epoch 2's if it was reached
    assert not list((tmp_path / "stopped").rglob("*.tmp"))
    resume_and_compare(tmp_path, env)
