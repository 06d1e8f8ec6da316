"""Pieces the jobs share: resolving data sets, and models from checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import timm
import torch
from pydantic import ValidationError
from torch import nn

from kdcli.checkpoint import CheckpointInfo, load_checkpoint, pretrained_info, tensors_mismatch
from kdcli.config import DataConfig, format_validation_error
from kdcli.data.augment import BatchAugment
from kdcli.data.bundle import DataBundle, DataRequest, ImageSplit, split_train_val
from kdcli.data.mixing import BatchMixing
from kdcli.data.vision import DataSetMissing
from kdcli.engine import TrainingData
from kdcli.errors import KdcliError, UsageError, first_line, one_line, unknown_name
from kdcli.hub import create_pretrained
from kdcli.models import create_model
from kdcli.registry import get_dataset_builder, load_model_plugins, model_plugin_failures
from kdcli.teacher import Resize

TIMM_PREFIX = "timm:"


def load_data(config: DataConfig) -> DataBundle:
    """``--data NAME[:ARG]`` through the ``kdcli.datasets`` entry points."""
    name, _, argument = config.name.partition(":")
    streaming = config.model_dump(include={"in_memory", "memory_budget_gb", "workers", "on_corrupt", "crop_pct", "crop_scale_min", "auto_augment"})
    request = DataRequest(
        argument=argument or None, root=config.root, download=config.download, image_size=config.image_size,
        synthetic=config.synthetic.model_dump(), val_split=config.val_split, split_seed=config.split_seed, streaming=streaming,
    )
    builder = get_dataset_builder(name)
    try:
        bundle = builder(request)
    except DataSetMissing as exc:
        hint = "delete it and download again" if exc.download_tried else "pass --download to fetch it"
        raise KdcliError(f"{exc}; {hint}") from None
    except KdcliError:
        raise
    except Exception as exc:  # a data-set plugin's own failure: name it, in one line
        raise KdcliError(f"data set {name!r} failed to load: {type(exc).__name__}: {one_line(str(exc))}") from None
    if bundle.num_classes < 2:
        raise KdcliError(f"data set {config.name} has {bundle.num_classes} class; a classifier needs at least 2")
    return bundle


def training_data(bundle: DataBundle, config: DataConfig) -> TrainingData:
    train, val = split_train_val(bundle.train, config.val_split, config.split_seed)
    mixing = batch_mixing(config, bundle.num_classes)
    if bundle.recipe is not None:
        recipe = bundle.recipe if config.hflip is None else replace(bundle.recipe, hflip=config.hflip)
        return TrainingData(
            train=train, val=val, augment=recipe, mean=bundle.mean, std=bundle.std, input_size=bundle.input_size, mixing=mixing
        )
    augment = BatchAugment(
        bundle.mean,
        bundle.std,
        crop_padding=bundle.crop_padding if config.crop_padding is None else config.crop_padding,
        hflip=bundle.hflip if config.hflip is None else config.hflip,
        rotation=config.rotation,
    )
    return TrainingData(
        train=train, val=val, augment=augment, mean=bundle.mean, std=bundle.std, input_size=bundle.input_size, mixing=mixing
    )


def batch_mixing(config: DataConfig, num_classes: int) -> BatchMixing | None:
    """Mixup/CutMix of the training batches as ``config`` sets them; None when both are off."""
    if not config.mixing:
        return None
    return BatchMixing(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, mix_prob=config.mix_prob, num_classes=num_classes)


def evaluation_split(bundle: DataBundle, config: DataConfig, split: str) -> ImageSplit:
    """``train`` and ``val`` are the same seeded partition the training run used."""
    if split == "test":
        return bundle.test
    train, val = split_train_val(bundle.train, config.val_split, config.split_seed)
    if split == "val":
        if val is None:
            raise UsageError("there is no validation split: the data config has val_split = 0")
        return val
    return train


def check_fits(info: CheckpointInfo, bundle: DataBundle, source: Path, *, any_image_size: bool = False) -> None:
    """A checkpoint must predict this data set's classes from inputs of its shape.

    ``any_image_size``: a pretrained timm model takes any height and width, only its channels must agree.
    """
    if info.num_classes != bundle.num_classes:
        raise UsageError(
            f"{source} predicts {info.num_classes} classes but data set {bundle.name} has {bundle.num_classes}"
        )
    compared = slice(0, 1) if any_image_size else slice(None)
    if tuple(info.input_size)[compared] != tuple(bundle.input_size)[compared]:
        raise UsageError(
            f"{source} expects inputs of shape {tuple(info.input_size)} but data set {bundle.name} "
            f"has {tuple(bundle.input_size)}"
        )


def require_model(name: str) -> None:
    """Import every model plugin, then fail unless ``name`` is a known model.

    An unknown name also lists the model plugins that failed to import: the
    model may live in one of them.
    """
    load_model_plugins()
    if timm.is_model(name):
        return
    error = unknown_name("model", name, timm.list_models())
    failures = model_plugin_failures()
    if failures:
        raise UsageError(f"{error} (model plugins that failed to import: {'; '.join(failures)})")
    raise error


def new_model(name: str, *, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """An untrained ``name`` (a timm model, or one a model plugin registers)."""
    require_model(name)
    return create_model(name, num_classes=num_classes, input_size=input_size)


def is_timm_teacher(reference: Path | str) -> bool:
    """``timm:NAME``: a pretrained timm model instead of a kdcli checkpoint file."""
    return str(reference).startswith(TIMM_PREFIX)


def load_teacher(reference: Path, *, network: bool = True) -> tuple[nn.Module, CheckpointInfo]:
    """The teacher a run names: a kdcli checkpoint file, or ``timm:NAME`` with timm's pretrained weights.

    ``network``: a timm teacher's weights may be downloaded when not in the cache (never in a dry run).
    """
    if is_timm_teacher(reference):
        return pretrained_timm_model(str(reference).removeprefix(TIMM_PREFIX), network=network)
    return model_from_checkpoint(reference)


def pretrained_timm_model(name: str, *, network: bool = True) -> tuple[nn.Module, CheckpointInfo]:
    """``timm.create_model(name, pretrained=True)`` with what its pretrained config says about its inputs.

    NAME is anything timm accepts (``resnet50.a1_in1k``, ``hf-hub:ORG/REPO``,
    ``local-dir:PATH``); weights come from the Hugging Face cache when present,
    else from the Hub within seconds (``kdcli.hub``).
    """
    if not name:
        raise UsageError("a timm teacher needs a model name: timm:NAME (e.g. timm:resnet50.a1_in1k or timm:local-dir:PATH)")
    try:
        model = create_pretrained(name, network=network)
    except KdcliError:
        raise
    except Exception as exc:  # unknown names, unreadable folders and files: all end the same way
        raise KdcliError(
            f"cannot load the pretrained timm teacher {name} ({first_line(exc)}); give a name timm knows "
            f"(e.g. resnet50.a1_in1k) or timm:local-dir:PATH, a folder with config.json and model.safetensors"
        ) from None
    return model, pretrained_info(model.pretrained_cfg, name=name, num_classes=model.num_classes)


def pretrained_resize(model: nn.Module, info: CheckpointInfo, input_size: tuple[int, int, int]) -> Resize | None:
    """What brings inputs of ``input_size`` to the size in a timm teacher's pretrained config; None when they agree."""
    size = (int(info.input_size[1]), int(info.input_size[2]))
    if size == tuple(input_size[1:]):
        return None
    return Resize(size, str(getattr(model, "pretrained_cfg", {}).get("interpolation", "bilinear")))


def model_from_checkpoint(path: Path) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes and load its weights.

    The architecture is first built on the meta device (no memory) and its
    tensors compared with the file's, so metadata that asks for an absurd
    model fails at once instead of allocating it.
    """
    weights, info = load_checkpoint(path)
    require_model(info.arch)
    try:
        with torch.device("meta"):
            expected = create_model(info.arch, num_classes=info.num_classes, input_size=info.input_size).state_dict()
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:  # the model's own checks on its arguments
        raise KdcliError(f"{path} describes a model that cannot be built ({info.arch}: {first_line(exc)})") from None
    mismatch = tensors_mismatch(weights, expected)
    if mismatch is not None:
        raise KdcliError(f"{path} does not match architecture {info.arch}: {mismatch}")
    model = create_model(info.arch, num_classes=info.num_classes, input_size=info.input_size)
    model.load_state_dict(weights)
    return model, info


# Data keys that say where a data set lives and whether to fetch it: never taken from a file kdcli reads.
DATA_LOCATION_KEYS = ("root", "download")


def checkpoint_data_config(info: CheckpointInfo, source: Path, *, root: Path | None, download: bool) -> DataConfig:
    """The data set a checkpoint was trained on, at ``root`` (the default when None) and downloaded only if ``download``.

    The file's digest proves it is whole, not who wrote it: its metadata names
    the data set, but never chooses network access or a place to write.
    """
    identity = {key: value for key, value in info.data.items() if key not in DATA_LOCATION_KEYS}
    location = {"download": download} | ({} if root is None else {"root": root})
    try:
        return DataConfig.model_validate(identity | location)
    except ValidationError as exc:
        raise KdcliError(f"{source} records an invalid data config: {format_validation_error(exc)}") from None
