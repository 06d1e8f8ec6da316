"""The streaming path: image files decoded in DataLoader worker processes, one batch at a time.

A ``FileSplit`` holds only paths and labels; ``StreamingLoader`` decodes its
files in persistent workers (pinned memory on CUDA) in the order of a
``DistributedSampler`` that depends on (seed, epoch) alone, and can start at
any step of an epoch without decoding the steps before it (mid-epoch resume).
Every PIL mode (grayscale, CMYK, RGBA, palette) becomes RGB.  A file that does
not decode travels as a marked empty row, so the main process decides:
training skips it and counts it, or stops naming it; evaluation always stops, and
a decompression bomb always stops the run by name.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kdcli.data.recipes import EvalView, TrainRecipe, replayable, sample_seed
from kdcli.errors import KdcliError

OnCorrupt = Literal["skip", "stop"]
UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises on files it cannot read
BOMB = "a decompression bomb"  # PIL's guard against a tiny file that decodes to gigabytes: always refused


@dataclass(frozen=True)
class FileSplit:
    """A split of image files: paths and labels in memory, pixels decoded when a batch is read."""

    files: tuple[str, ...]
    targets: Tensor  # int64 [N]
    view: EvalView
    workers: int = 0
    on_corrupt: OnCorrupt = "skip"
    p_star: None = None  # real photos: the true label distribution is unknown

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: Tensor) -> FileSplit:
        return replace(self, files=tuple(self.files[i] for i in index.tolist()), targets=self.targets[index])

    def digest(self) -> str:
        """Paths, sizes, modification times and labels: what the decoded pixels are a function of."""
        digest = hashlib.blake2b(digest_size=16)
        for file in self.files:
            status = os.stat(file)
            digest.update(f"{file}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        digest.update(self.targets.contiguous().numpy().data)
        return digest.hexdigest()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int, worker_id: int) -> None:
    """A loader worker dies with the process that started it, at once and silently.

    torch's own watchdog polls every 5 s and a worker caught mid-put prints a
    traceback; the kernel's parent-death signal (Linux) does neither.  SIGKILL
    leaves nothing to clean up: the worker holds no files of its own.
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(0)


def decode_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class _FileDataset(Dataset):
    """Item ``(index, epoch)``: the decoded, transformed image, its label, its index and a decode error ("" if none)."""

    def __init__(self, split: FileSplit, recipe: TrainRecipe | None, seed: int) -> None:
        self.files, self.targets, self.seed = split.files, split.targets, seed
        self.size = split.view.size if recipe is None else recipe.size
        self.transform = split.view.transform() if recipe is None else recipe.transform()
        self.random = recipe is not None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int, str]:
        index, epoch = key
        try:
            image = decode_rgb(self.files[index])
        except Image.DecompressionBombError as exc:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), self.targets[index], index, f"{BOMB} ({exc})"
        except UNREADABLE as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), self.targets[index], index, reason
        if self.random:
            return replayable(self.transform, image, sample_seed(self.seed, epoch, index)), self.targets[index], index, ""
        return self.transform(image), self.targets[index], index, ""


class _BatchPlan:
    """Batches of ``(index, epoch)`` keys in the sampler's order, from ``start`` on (a mutable batch sampler)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_single: bool) -> None:
        self.sampler, self.batch_size, self.drop_single = sampler, batch_size, drop_single
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return -(-self.sampler.num_samples // self.batch_size) - int(self.drop_single)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = list(self.sampler)
        for step in range(self.start, len(self)):
            yield [(index, self.epoch) for index in order[step * self.batch_size : (step + 1) * self.batch_size]]


class StreamingLoader:
    """Yields ``(images_uint8, targets, index)`` on ``device``, like ``BatchLoader`` over an in-memory split.

    With ``recipe`` each image is a replayable training view; without, the split's evaluation view.
    """

    def __init__(
        self,
        split: FileSplit,
        *,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        recipe: TrainRecipe | None = None,
    ) -> None:
        self.split, self.device = split, device
        sampler = DistributedSampler(range(len(split)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.plan = _BatchPlan(sampler, batch_size, drop_single=shuffle and sampler.num_samples % batch_size == 1)
        workers = split.workers
        self.loader = DataLoader(
            _FileDataset(split, recipe, seed), batch_sampler=self.plan, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=functools.partial(end_with_parent, os.getpid()) if workers > 0 else None,
        )
        self.skipped = 0  # corrupt files dropped by ``skip_corrupt`` batches

    def set_epoch(self, epoch: int) -> None:
        self.plan.sampler.set_epoch(epoch)
        self.plan.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.iterate(0, skip_corrupt=False)

    def iterate(self, start: int, *, skip_corrupt: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The epoch's batches from step ``start``; corrupt files are dropped (and counted) or stop the run."""
        self.plan.start = start
        for images, targets, index, errors in self.loader:
            bad = [position for position, error in enumerate(errors) if error]
            refused = [position for position in bad if errors[position].startswith(BOMB) or not skip_corrupt]
            if refused:
                position = refused[0]
                raise KdcliError(f"cannot decode image {self.split.files[int(index[position])]}: {errors[position]}")
            if bad:
                self.skipped += len(bad)
                keep = torch.tensor([not error for error in errors])
                images, targets, index = images[keep], targets[keep], index[keep]
            if len(index):  # a batch of corrupt files only is no step
                yield images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True), index.to(self.device)
