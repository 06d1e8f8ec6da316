"""Pixel-scale input noise and ``kdcli eval --noise-std``: right statistics, reproducible noisy test sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_cli
from kdcli.noise import PixelNoise

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.1)


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def to_pixels(inputs: torch.Tensor) -> torch.Tensor:
    return inputs * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)


def test_gaussian_sigma_is_on_the_pixel_scale_for_every_channel() -> None:
    clean = normalized(torch.rand(64, 3, 16, 16))
    noisy = PixelNoise(sigma=0.2)(clean, MEAN, STD, torch.Generator().manual_seed(0))
    pixel_noise = to_pixels(noisy) - to_pixels(clean)
    for channel in range(3):
        assert pixel_noise[:, channel].std().item() == pytest.approx(0.2, rel=0.03)
        assert abs(pixel_noise[:, channel].mean().item()) < 0.005


def test_sigma_range_draws_one_sigma_per_sample() -> None:
    clean = normalized(torch.rand(200, 3, 16, 16))
    noisy = PixelNoise(sigma=(0.1, 0.3))(clean, MEAN, STD, torch.Generator().manual_seed(0))
    per_sample = (to_pixels(noisy) - to_pixels(clean)).flatten(1).std(dim=1)
    assert per_sample.min().item() > 0.09 and per_sample.max().item() < 0.31
    assert per_sample.std().item() > 0.04  # spread over the range, not one sigma for all


def test_poisson_gaussian_variance_grows_with_intensity() -> None:
    photons, read = 20.0, 0.05
    noise = PixelNoise(sigma=read, photons=photons)
    for level in (0.2, 0.8):
        clean = normalized(torch.full((32, 3, 16, 16), level))
        pixels = to_pixels(noise(clean, MEAN, STD, torch.Generator().manual_seed(1)))
        assert pixels.mean().item() == pytest.approx(level, abs=0.01)
        assert pixels.var().item() == pytest.approx(level / photons + read**2, rel=0.05)


def test_seeded_noise_depends_on_seed_and_position_only() -> None:
    clean = normalized(torch.rand(10, 3, 8, 8))
    index = torch.arange(100, 110)
    noise = PixelNoise(sigma=0.1)
    whole = noise.seeded(clean, index, MEAN, STD, seed=3)
    halves = torch.cat([noise.seeded(clean[:4], index[:4], MEAN, STD, seed=3), noise.seeded(clean[4:], index[4:], MEAN, STD, seed=3)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, noise.seeded(clean, index, MEAN, STD, seed=4))


def test_invalid_noise_is_rejected() -> None:
    with pytest.raises(ValueError):
        PixelNoise(sigma=(0.3, 0.1))
    with pytest.raises(ValueError):
        PixelNoise(sigma=0.1, photons=0.0)


def test_eval_noise_std_is_seeded_and_independent_of_batch_size(teacher_run: Path) -> None:
    checkpoint = teacher_run / "last.safetensors"
    clean = run_cli("eval", checkpoint, "--json").json()
    noisy = run_cli("eval", checkpoint, "--noise-std", "0.5", "--json").json()
    rebatched = run_cli("eval", checkpoint, "--noise-std", "0.5", "--batch-size", "7", "--json").json()
    assert clean["noise"] is None and noisy["noise"] == {"std": 0.5, "photons": None, "seed": 0}
    assert noisy["metrics"] == pytest.approx(rebatched["metrics"], rel=1e-5)
    assert noisy["metrics"]["nll"] != pytest.approx(clean["metrics"]["nll"])
    other_seed = run_cli("eval", checkpoint, "--noise-std", "0.5", "--noise-seed", "1", "--json").json()
    assert other_seed["metrics"]["nll"] != pytest.approx(noisy["metrics"]["nll"])
    table = run_cli("eval", checkpoint, "--noise-std", "0.05", "--noise-photons", "30")
    assert table.exit_code == 0 and "σ=0.05" in table.stdout and "photons=30" in table.stdout
    bad = run_cli("eval", checkpoint, "--noise-std", "-0.1")
    assert bad.exit_code == 2 and bad.stderr.startswith("kdcli: error: --noise-std") and "Traceback" not in bad.stderr
