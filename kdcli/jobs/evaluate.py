"""``eval``: rebuild a model from its checkpoint alone and measure it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kdcli.config import MAX_SEED, DataConfig, TrainConfig, format_validation_error
from kdcli.defaults import EVAL_SPLITS
from kdcli.data.bundle import DataBundle, ImageSplit
from kdcli.noise import PixelNoise
from kdcli.errors import UsageError
from kdcli.inference import InputTransform, predict
from kdcli.jobs.common import check_fits, checkpoint_data_config, evaluation_split, load_data, model_from_checkpoint
from kdcli.metrics import classification_report, distance_to_true_distribution
from kdcli.runtime import runtime_for


def evaluate_checkpoint(
    checkpoint: Path,
    *,
    data: str | None = None,
    data_root: Path | None = None,
    download: bool = False,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 512,
    noise_std: float = 0.0,
    noise_photons: float | None = None,
    noise_seed: int = 0,
    bundle: DataBundle | None = None,
) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on ``split`` of its own data set (or ``data``).

    Where the data set knows the true label distribution p*, the distance of
    the model's predictions to it is reported on the train and test inputs.
    With ``noise_std`` (σ on the [0, 1] pixel scale) or ``noise_photons``
    (Poisson–Gaussian), every input is corrupted by noise that depends only on
    ``noise_seed`` and the sample's position: every checkpoint evaluated with
    the same flags sees the same noisy inputs.
    ``bundle`` is that data set when the caller has already loaded it.
    """
    if split not in EVAL_SPLITS:
        raise UsageError(f"--split must be one of {', '.join(EVAL_SPLITS)} (got {split!r})")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive (got {batch_size})")
    if not 0 <= noise_seed <= MAX_SEED:
        raise UsageError(f"--noise-seed must be in 0..{MAX_SEED} (got {noise_seed})")
    try:
        settings = TrainConfig(device=device)
    except ValidationError as exc:
        raise UsageError(f"invalid --device: {format_validation_error(exc)}") from None
    noise = input_noise(noise_std, noise_photons)
    model, info = model_from_checkpoint(checkpoint)
    data_config = checkpoint_data_config(info, checkpoint, root=data_root, download=download)
    if data is not None:
        data_config = data_config.model_copy(update={"name": data})
    if bundle is None:
        bundle = load_data(data_config)
    check_fits(info, bundle, checkpoint)
    transform = None if noise is None else seeded_noise(noise, info.mean, info.std, noise_seed)
    with runtime_for(settings) as runtime:
        model = model.to(runtime.device)
        measure = _Measure(model, bundle, data_config, info.mean, info.std, runtime.device, batch_size, transform)
        metrics, samples = measure.report(split)
    return {
        "checkpoint": str(checkpoint),
        "arch": info.arch,
        "method": info.method,
        "epoch": info.epoch,
        "data": data_config.name,
        "split": split,
        "num_samples": len(samples),
        "noise": None if noise is None else {"std": noise_std, "photons": noise_photons, "seed": noise_seed},
        "metrics": metrics,
        "lineage": teacher_chain(info.lineage),
    }


def teacher_chain(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """The teachers a checkpoint descends from, nearest first (each without its own nested lineage)."""
    chain = []
    while isinstance(lineage.get("teacher"), dict):
        teacher = lineage["teacher"]
        chain.append({key: value for key, value in teacher.items() if key != "lineage"})
        lineage = teacher.get("lineage") or {}
    return chain


@dataclass(frozen=True)
class _Measure:
    """One model's predictions on the splits of one data set, with the same inputs every call."""

    model: nn.Module
    bundle: DataBundle
    data_config: DataConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    batch_size: int
    transform: InputTransform | None

    def logits(self, split: str) -> tuple[Tensor, ImageSplit]:
        samples = evaluation_split(self.bundle, self.data_config, split)
        logits = predict(
            self.model, samples, mean=self.mean, std=self.std, device=self.device, batch_size=self.batch_size, transform=self.transform
        )
        return logits, samples

    def report(self, split: str) -> tuple[dict[str, float], ImageSplit]:
        """Metrics on ``split``; where p* is known, the distance to it on the train and test inputs too."""
        logits, samples = self.logits(split)
        metrics = classification_report(logits, samples.targets)
        if self.bundle.test.p_star is not None:
            for name in ("train", "test"):
                split_logits, split_samples = (logits, samples) if name == split else self.logits(name)
                distance = distance_to_true_distribution(split_logits.softmax(dim=1), split_samples.p_star)
                metrics.update({f"pstar_{key}_{name}": value for key, value in distance.items()})
        return metrics, samples


def input_noise(std: float, photons: float | None) -> PixelNoise | None:
    if not 0 <= std < math.inf:  # also refuses NaN, which compares false with everything
        raise UsageError(f"--noise-std must be finite and >= 0 (got {std})")
    if photons is not None and not 0 < photons < math.inf:
        raise UsageError(f"--noise-photons must be finite and positive (got {photons})")
    noise = PixelNoise(sigma=std, photons=photons)
    return None if noise.is_identity else noise


def seeded_noise(noise: PixelNoise, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> InputTransform:
    return lambda inputs, index: noise.seeded(inputs, index, mean, std, seed)
