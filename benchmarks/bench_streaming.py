"""The streaming image-folder path against timm's ``create_loader`` on the same folder, and its memory.

Both decode the same JPEGs (sizes 200-500 px) with the same worker count and
the same train transform (RandomResizedCrop 224, scale 0.08-1, flip; no colour
jitter or erasing), batch 64, normalized float32 batches on the CPU. Epochs of
the two alternate (after one warm-up epoch each) so drifting load hits both;
each side's min/median/max over the rounds is printed and the medians compared. Peak RSS: one streaming epoch over the folder
and over a folder twice as large, each in a fresh process (workers excluded).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import timm.data
import torch
from PIL import Image

from benchmarks.common import report, scaled
from kdcli.data.loading import training_epochs
from kdcli.data.vision import IMAGENET_MEAN, IMAGENET_STD, load_imagefolder

IMAGES, WORKERS, BATCH, SIZE, ROUNDS = scaled(384, 32), 2, scaled(64, 8), scaled(224, 32), scaled(7, 1)


def write_folder(root: Path, images: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", images), ("val", 8)):
        for number in range(count):
            folder = root / split / f"class{number % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (int(value) for value in torch.randint(200, 500, (2,), generator=generator))
            pixels = torch.randint(0, 256, (height // 8, width // 8, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).resize((width, height)).save(folder / f"{number}.jpg", quality=90)
    return root


def kdcli_epochs(root: Path) -> Callable[[int], Iterable[object]]:
    bundle = load_imagefolder(root, image_size=SIZE, in_memory=False, workers=WORKERS)
    epochs = training_epochs(bundle.train, bundle.recipe, batch_size=BATCH, device=torch.device("cpu"), seed=0)
    return lambda epoch: (inputs for inputs, _, _ in epochs.batches(epoch, 0))


def timm_epochs(root: Path) -> Callable[[int], Iterable[object]]:
    dataset = timm.data.create_dataset("", root=str(root / "train"))
    loader = timm.data.create_loader(
        dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True, scale=(0.08, 1.0), hflip=0.5,
        color_jitter=0.0, re_prob=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=WORKERS,
        use_prefetcher=False, persistent_workers=True, device=torch.device("cpu"),
    )
    return lambda epoch: (inputs for inputs, _ in loader)


def images_per_second(epoch: Callable[[int], Iterable[object]], number: int) -> float:
    started, count = time.perf_counter(), 0
    for inputs in epoch(number):
        count += len(inputs)  # type: ignore[arg-type]
    return count / (time.perf_counter() - started)


def peak_rss_mib(root: Path) -> float:
    code = (
        "import resource, torch; from benchmarks.bench_streaming import kdcli_epochs; from pathlib import Path; "
        f"[None for _ in kdcli_epochs(Path({str(root)!r}))(1)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = write_folder(Path(scratch) / "folder", IMAGES)
        sides = {"timm create_loader": timm_epochs(root), "kdcli streaming": kdcli_epochs(root)}
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for number in range(ROUNDS + 1):
            for name, epoch in sides.items():
                rate = images_per_second(epoch, number)
                if number:  # round 0 warms up
                    rates[name].append(rate)
        for side, values in rates.items():
            print(f"streaming loader, {side}: min {min(values):.4g}, median {statistics.median(values):.4g}, max {max(values):.4g} images/s over {ROUNDS} epochs", flush=True)
        name = f"streaming loader, medians ({IMAGES} JPEGs, {WORKERS} workers, RRC {SIZE} + flip, batch {BATCH})"
        medians = {side: statistics.median(values) for side, values in rates.items()}
        report(name, "timm create_loader", medians["timm create_loader"], "kdcli", medians["kdcli streaming"], unit="images/s", target=">= 1.0x")
        double = write_folder(Path(scratch) / "double", 2 * IMAGES)
        report("peak RSS of a streaming epoch (folder vs twice as large)", "folder", peak_rss_mib(root), "2x folder", peak_rss_mib(double),
               unit="MiB", target="<= 1.10x")
