"""The training loop RepDistiller (and mdistiller) run, as the baseline of ``benchmarks/gpu_check.py``.

Its parts, as in RepDistiller's ``train_student.py`` / ``helper/loops.py``:
torchvision's CIFAR ``Dataset`` (``__getitem__`` turns one HWC uint8 array into
a PIL image and runs ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize``), a ``DataLoader`` with worker processes, fp32,
``cudnn.benchmark``, a blocking ``.cuda()`` per batch, and ``loss.item()`` plus
top-1 read back every step for its meters.  It trains on the same uint8 tensors
as the kdcli loops, so only the loop differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks.common import gpu_utilization, synchronize
from kdcli.data.bundle import DataBundle
from kdcli.models import create_model
from kdcli.registry import load_model_plugins

class CifarStyleDataset(Dataset):
    """torchvision.datasets.CIFAR100's in-memory layout and ``__getitem__``, on given pixels."""

    def __init__(self, images: Tensor, targets: Tensor, transform: Callable[[Image.Image], Tensor]) -> None:
        self.data: np.ndarray = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C uint8, as torchvision keeps it
        self.targets: list[int] = targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


@dataclass(frozen=True)
class LoopTiming:
    images_per_s: float
    warmup_s: float
    data_share: float  # time blocked waiting for the DataLoader
    gpu_utilization: float | None


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """RepDistiller's ``DistillKL``."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / student_logits.shape[0]


def repdistiller_loader(bundle: DataBundle, batch_size: int, workers: int) -> DataLoader:
    size = bundle.input_size[1]
    transform = transforms.Compose([
        transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(bundle.mean, bundle.std),
    ])
    dataset = CifarStyleDataset(bundle.train.images, bundle.train.targets, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)


def epochs_of(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of one epoch after another (new workers each epoch, as RepDistiller's loop gets them)."""
    while True:
        yield from loader


def repdistiller_throughput(
    bundle: DataBundle, *, teacher: str, student: str, batch_size: int, workers: int, warmup_steps: int, steps: int,
    device: torch.device,
) -> LoopTiming:
    """Images/s of ``steps`` KD steps (gamma 0.1 CE + alpha 0.9 KL, tau 4) after ``warmup_steps``."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    load_model_plugins()  # the CIFAR zoo registers into timm
    models = [create_model(name, num_classes=bundle.num_classes, input_size=bundle.input_size).to(device) for name in (teacher, student)]
    model_t, model_s = models[0].eval(), models[1].train()
    optimizer = torch.optim.SGD(model_s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = epochs_of(repdistiller_loader(bundle, batch_size, workers))
    started = time.perf_counter()
    for _ in range(warmup_steps):  # worker start-up and cuDNN autotuning
        train_step(next(batches), model_t, model_s, optimizer, device)
    synchronize(device)
    warmup = time.perf_counter() - started
    waiting = 0.0
    with gpu_utilization(device) as samples:
        started = time.perf_counter()
        for _ in range(steps):
            asked = time.perf_counter()
            batch = next(batches)
            waiting += time.perf_counter() - asked
            train_step(batch, model_t, model_s, optimizer, device)
        synchronize(device)
        elapsed = time.perf_counter() - started
    utilization = sum(samples) / len(samples) if samples else None
    return LoopTiming(steps * batch_size / elapsed, warmup, waiting / elapsed, utilization)


def train_step(batch: tuple[Tensor, Tensor], model_t: nn.Module, model_s: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    inputs, targets = (tensor.to(device) for tensor in batch)
    with torch.no_grad():
        logit_t = model_t(inputs)
    logit_s = model_s(inputs)
    loss = 0.1 * F.cross_entropy(logit_s, targets) + 0.9 * distill_kl(logit_s, logit_t)
    # RepDistiller's AverageMeters read the loss and top-1 back every step: a host sync it pays.
    loss.item()
    logit_s.argmax(dim=1).eq(targets).float().mean().item()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
