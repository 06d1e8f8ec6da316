"""``predict``: the top-k classes of image files, from a checkpoint alone."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from torch import Tensor
from torchvision.transforms import v2

from kdcli.checkpoint import CheckpointInfo
from kdcli.config import TrainConfig, format_validation_error
from kdcli.data.bundle import ImageSplit
from kdcli.data.memory import require_memory
from kdcli.errors import KdcliError, UsageError, one_line
from kdcli.files import require_regular_file
from kdcli.inference import predict
from kdcli.jobs.common import model_from_checkpoint
from kdcli.runtime import runtime_for

PIXEL_BUDGET = 1 << 26  # 67 Mpixel per decoded or resized image: 200 MB as RGB, beyond any photo a classifier reads


def classify_images(checkpoint: Path, images: list[Path], *, top_k: int = 5, device: str = "auto", batch_size: int = 64) -> list[dict[str, Any]]:
    """For each image, the ``top_k`` classes and their probabilities, prepared as the image-folder recipe prepares them."""
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive (got {batch_size})")
    try:
        settings = TrainConfig(device=device)
    except ValidationError as exc:
        raise UsageError(f"invalid --device: {format_validation_error(exc)}") from None
    model, info = model_from_checkpoint(checkpoint)
    check_input_size(info, checkpoint, len(images))
    pixels = torch.stack([load_image(path, info) for path in images])
    with runtime_for(settings) as runtime:
        split = ImageSplit(pixels, torch.zeros(len(images), dtype=torch.int64))
        logits = predict(model.to(runtime.device), split, mean=info.mean, std=info.std, device=runtime.device, batch_size=batch_size)
    names = class_names(info)
    return [_ranked(path, row, min(top_k, info.num_classes), names) for path, row in zip(images, logits.softmax(dim=1))]


def _ranked(path: Path, probabilities: Tensor, k: int, names: list[str] | None) -> dict[str, Any]:
    values, indices = probabilities.topk(k)
    top = [
        {"class": int(index), "name": None if names is None else names[int(index)], "probability": float(value)}
        for value, index in zip(values, indices)
    ]
    return {"image": str(path), "top": top}


def load_image(path: Path, info: CheckpointInfo) -> Tensor:
    """uint8 [C, H, W]: short side resized to the checkpoint's input size, then center-cropped."""
    channels, height, width = info.input_size
    if channels not in (1, 3):
        raise KdcliError(f"predict reads RGB or grayscale images; the checkpoint expects {channels} channels")
    require_regular_file(path, "image")
    resize = v2.Compose([v2.Resize(min(height, width)), v2.CenterCrop((height, width)), v2.PILToTensor()])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning becomes our one line
            with Image.open(path) as image:  # reads the header only: the pixel budget is checked before decoding
                _check_pixels(path, image.size, min(height, width))
                return resize(image.convert("RGB" if channels == 3 else "L"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise KdcliError(f"refusing image {path}: a decompression bomb ({one_line(str(error), 160)})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:  # ValueError: PIL's chunk-size limits
        raise KdcliError(f"cannot read image {path}: {one_line(str(error)) or type(error).__name__}") from None


def _check_pixels(path: Path, size: tuple[int, int], short_side: int) -> None:
    """Refuse an image whose decoded or resized pixels exceed ``PIXEL_BUDGET`` (a 1x10^7 strip resizes to gigapixels)."""
    width, height = size
    scale = short_side / max(1, min(width, height))
    resized = round(width * scale) * round(height * scale)
    if width * height > PIXEL_BUDGET or resized > PIXEL_BUDGET:
        raise KdcliError(f"refusing image {path}: {width}x{height} pixels (resized to a short side of {short_side}: {resized}) "
                         f"exceed predict's budget of {PIXEL_BUDGET} pixels")


def check_input_size(info: CheckpointInfo, checkpoint: Path, count: int) -> None:
    """The model input the checkpoint asks for, checked against the pixel budget and memory before any image is read."""
    channels, height, width = info.input_size
    if height * width > PIXEL_BUDGET:
        raise KdcliError(f"{checkpoint} asks for inputs of {height}x{width} pixels, more than predict's budget of {PIXEL_BUDGET}")
    require_memory(f"{count} images of {channels}x{height}x{width}", count * channels * height * width * 5, "the number of images")


def class_names(info: CheckpointInfo) -> list[str] | None:
    """Folder names of an image-folder data set, when it is on this machine: ImageFolder numbers them in sorted order."""
    name = str(info.data.get("name", ""))
    if not name.startswith("imagefolder:"):
        return None
    train = Path(name.partition(":")[2]) / "train"
    folders = sorted(entry.name for entry in train.iterdir() if entry.is_dir()) if train.is_dir() else []
    return folders if len(folders) == info.num_classes else None
