"""Data path: kdcli's in-memory batched augmentation against the KD anchors' pipeline.

The anchors (RepDistiller, mdistiller) read CIFAR through a torchvision dataset
that builds one PIL image per sample, apply RandomCrop(32, 4) +
RandomHorizontalFlip + ToTensor + Normalize per image, and batch with a
DataLoader and worker processes.  kdcli keeps the uint8 set on the training
device and crops/flips whole batches there, with the engine's replayable
per-sample draws (``EpochAugmentation``).  Both produce normalized float batches
on the training device; images per second over one epoch, best of ``REPEATS``
epochs per side, the sides interleaved so drifting machine load hits both.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks.common import report, scaled
from kdcli.data.augment import BatchAugment, EpochAugmentation
from kdcli.data.bundle import ImageSplit
from kdcli.data.loader import BatchLoader

NUM_IMAGES = scaled(10_000, 128)
BATCH_SIZE = 64
REPEATS = scaled(3, 1)
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class PilCifar(Dataset):
    """What ``torchvision.datasets.CIFAR100.__getitem__`` does, over an in-memory HWC array."""

    def __init__(self, images_hwc: np.ndarray, targets: list[int], transform: transforms.Compose) -> None:
        self.images, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


def anchor_images_per_second(images_hwc: np.ndarray, targets: list[int], device: torch.device) -> float:
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    workers = min(4, os.cpu_count() or 1)
    loader = DataLoader(PilCifar(images_hwc, targets, transform), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    started = time.perf_counter()
    seen = 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def kdcli_images_per_second(split: ImageSplit, device: torch.device, epoch: int) -> float:
    augment = BatchAugment(MEAN, STD, crop_padding=4, hflip=True)
    loader = BatchLoader(split, batch_size=BATCH_SIZE, shuffle=True, device=device)
    loader.set_epoch(epoch)
    started = time.perf_counter()
    augmentation = EpochAugmentation(augment, len(split), seed=epoch, device=device)
    seen = 0
    for images, targets, index in loader:
        augmentation(images, index)
        seen += len(targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 100, (NUM_IMAGES,), generator=generator)
    images_hwc, split = images.permute(0, 2, 3, 1).numpy(), ImageSplit(images, targets)
    anchor, ours = [], []
    for epoch in range(REPEATS):
        anchor.append(anchor_images_per_second(images_hwc, targets.tolist(), device))
        ours.append(kdcli_images_per_second(split, device, epoch))
    report(
        f"data path (CIFAR-size, {NUM_IMAGES} images, batch {BATCH_SIZE}, crop+flip+normalize on {device.type}, best of {REPEATS})",
        "DataLoader+PIL", max(anchor), "kdcli in-memory", max(ours), unit="images/s",
    )


if __name__ == "__main__":
    main()
