"""Real image data sets: CIFAR through torchvision, held in memory; image folders in memory or streamed."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from kdcli.data.bundle import DataBundle, ImageSplit
from kdcli.data.memory import require_memory
from kdcli.data.recipes import AutoAugment, EvalView, TrainRecipe
from kdcli.data.stream import BOMB, UNREADABLE, FileSplit, OnCorrupt, decode_rgb
from kdcli.errors import KdcliError, UsageError, one_line
from kdcli.files import require_regular_file

CIFAR_STATS = {
    10: (datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: (datasets.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_cifar(root: Path, *, num_classes: int, download: bool) -> DataBundle:
    """CIFAR-10 or CIFAR-100 from ``root``, fetched there first when ``download``; crop 4 + flip recipe."""
    if num_classes not in CIFAR_STATS:
        raise UsageError(f"CIFAR comes with 10 or 100 classes, not {num_classes}")
    dataset_class, mean, std = CIFAR_STATS[num_classes]
    train = _cifar_split(dataset_class, root, train=True, download=download)
    test = _cifar_split(dataset_class, root, train=False, download=False)
    return DataBundle(
        name=f"cifar{num_classes}",
        num_classes=num_classes,
        input_size=(3, 32, 32),
        mean=mean,
        std=std,
        train=train,
        test=test,
        crop_padding=4,
        hflip=True,
    )


class DataSetMissing(KdcliError):
    """A data set's files are missing or damaged; ``download_tried`` says whether downloading was on."""

    def __init__(self, message: str, *, download_tried: bool) -> None:
        super().__init__(message)
        self.download_tried = download_tried


def _cifar_split(
    dataset_class: type[datasets.CIFAR10], root: Path, *, train: bool, download: bool
) -> ImageSplit:
    name = dataset_class.__name__.replace("CIFAR", "CIFAR-")
    try:
        dataset = dataset_class(str(root), train=train, download=download)
    except RuntimeError as error:  # torchvision's "not found or corrupted" (md5 checks)
        folder = Path(root) / dataset_class.base_folder
        raise DataSetMissing(f"{name} not found or corrupted in {folder}", download_tried=download) from error
    except OSError as error:  # network failures while downloading
        raise KdcliError(f"could not download {name} into {root}: {error}") from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.int64))


def load_imagefolder(
    path: Path,
    *,
    image_size: int,
    in_memory: bool | str = True,
    memory_budget_gb: float = 4.0,
    workers: int | None = None,
    on_corrupt: OnCorrupt = "skip",
    crop_pct: float = 0.875,
    crop_scale_min: float = 0.08,
    auto_augment: AutoAugment = "none",
) -> DataBundle:
    """An ImageNet-style tree ``path/{train,val}/<class>/<image>``, in memory or streamed.

    In memory (``in_memory=True``, or ``"auto"`` when the decoded set fits
    ``memory_budget_gb``): every image's short side is resized to ``image_size``,
    the center square kept, and the whole set held as uint8 (Tiny-ImageNet at
    64 px: 1.2 GB); training then uses the CIFAR-style crop + flip, its padding
    scaled to the image size.  Streamed: files are decoded in ``workers``
    processes with the ImageNet recipes (``kdcli.data.recipes``).
    """
    train_set, val_set = _scan(Path(path))
    decoded = (len(train_set) + len(val_set)) * 3 * image_size**2
    if in_memory is True or (in_memory == "auto" and decoded <= memory_budget_gb * 2**30):
        (train, unreadable), (test, _) = (_decode_all(dataset, image_size, skip=on_corrupt == "skip" and dataset is train_set) for dataset in (train_set, val_set))
        return replace(_bundle(len(train_set.classes), image_size, train, test), unreadable=unreadable)
    # Streamed views are made a batch at a time: refuse sizes no batch of them could fit (float32 after normalizing).
    require_memory(f"a batch of 64 views of {image_size}x{image_size} pixels", 64 * 3 * image_size**2 * 4, "data.image_size")
    view = EvalView(image_size, crop_pct)
    count, notes = _worker_count(workers)
    train, test = (_file_split(dataset, view, count, on_corrupt) for dataset in (train_set, val_set))
    recipe = TrainRecipe(image_size, IMAGENET_MEAN, IMAGENET_STD, scale=(crop_scale_min, 1.0), auto_augment=auto_augment)
    return replace(_bundle(len(train_set.classes), image_size, train, test, recipe), notes=notes)


def _worker_count(workers: int | None) -> tuple[int, tuple[str, ...]]:
    """Decoding processes: at most one per CPU (each holds a copy of the loader; 500 of them exhaust memory)."""
    cpus = os.cpu_count() or 1
    if workers is None:
        return min(8, cpus), ()
    if workers > cpus:
        return cpus, (f"note: data.workers={workers} capped at {cpus}, the number of CPUs",)
    return workers, ()


def _scan(path: Path) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    train_root, val_root = path / "train", path / "val"
    for folder in (train_root, val_root):
        if not folder.is_dir():
            raise KdcliError(f"image folder {path} has no {folder.name}/ sub-folder (needs train/ and val/)")
    train_set, val_set = (_image_folder(folder) for folder in (train_root, val_root))
    if val_set.classes != train_set.classes:
        raise KdcliError(
            f"{val_root} holds other class folders than {train_root}; val/ needs one folder per train/ class"
            " (Tiny-ImageNet: sort val/images into class folders by val_annotations.txt first)"
        )
    return train_set, val_set


def _bundle(
    num_classes: int, image_size: int, train: ImageSplit | FileSplit, test: ImageSplit | FileSplit, recipe: TrainRecipe | None = None
) -> DataBundle:
    return DataBundle(
        name="imagefolder",
        num_classes=num_classes,
        input_size=(3, image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train=train,
        test=test,
        crop_padding=image_size // 8,
        hflip=True,
        recipe=recipe,
    )


def _file_split(dataset: datasets.ImageFolder, view: EvalView, workers: int, on_corrupt: OnCorrupt) -> FileSplit:
    files = tuple(file for file, _ in dataset.samples)
    return FileSplit(files, torch.tensor(dataset.targets, dtype=torch.int64), view, workers, on_corrupt)


def _image_folder(folder: Path) -> datasets.ImageFolder:
    _refuse_symlink_loops(folder)
    try:
        dataset = datasets.ImageFolder(str(folder))
    except FileNotFoundError as error:  # no class folders, or no images in one
        raise KdcliError(f"no images found in {folder}: {error}") from error
    for file, _ in dataset.samples:  # before any file is opened: reading a FIFO blocks forever
        require_regular_file(Path(file), "image")
    return dataset


def _refuse_symlink_loops(folder: Path) -> None:
    """ImageFolder follows symlinks: one that leads back up the tree would list the same images over and over."""
    seen: set[str] = set()
    for current, _, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            raise KdcliError(f"symlink loop or duplicate in {folder}: {current} leads to {real} again, whose images would count twice")
        seen.add(real)


def _decode_all(dataset: datasets.ImageFolder, image_size: int, *, skip: bool) -> tuple[ImageSplit, tuple[str, ...]]:
    """Every image decoded and center-cropped; with ``skip`` files that do not decode are left out and named."""
    require_memory(f"{len(dataset)} images of {image_size}x{image_size} pixels", len(dataset) * 3 * image_size**2, "data.image_size")
    # Decoding stays with PIL: torchvision.io's decoders are deprecated since 0.29.
    resize = v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size), v2.PILToTensor()])
    images = torch.empty(len(dataset), 3, image_size, image_size, dtype=torch.uint8)
    kept, unreadable = [], []
    for position, (file, _) in enumerate(dataset.samples):
        try:
            images[len(kept)] = resize(decode_rgb(file))
        except Image.DecompressionBombError as error:  # PIL's guard against a tiny file decoding to gigabytes
            raise KdcliError(f"refusing image {file}: {BOMB} ({one_line(str(error), 160)})") from None
        except UNREADABLE as error:  # PIL cannot identify or read the file
            if not skip:
                raise KdcliError(f"cannot decode image {file}: {one_line(str(error))}") from None
            unreadable.append(file)
            continue
        kept.append(position)
    targets = torch.tensor(dataset.targets, dtype=torch.int64)[kept]
    return ImageSplit(images[: len(kept)], targets), tuple(unreadable)
