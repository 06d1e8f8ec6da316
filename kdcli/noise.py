"""Input noise specified on the [0, 1] pixel scale and added to normalized images.

Batches reach methods and models normalized, ``(x - mean) / std`` per channel,
while noise levels are quoted on the pixel scale (σ = 0.1 is a tenth of the
pixel range).  Gaussian noise therefore becomes ``σ / std`` per channel in
normalized space; Poisson–Gaussian noise is drawn on the pixel values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PixelNoise:
    """``x̃ = x + σ·ε`` on the pixel scale, or with ``photons`` set ``x̃ = Poisson(photons·x)/photons + σ·ε``.

    ``sigma`` is one value or a ``(low, high)`` range from which each sample
    draws its own σ uniformly.  ``photons`` is the expected photon count of a
    pixel at value 1 (shot noise of a sensor; fewer photons = noisier), and
    σ is then the read noise.
    """

    sigma: float | tuple[float, float] = 0.0
    photons: float | None = None

    def __post_init__(self) -> None:
        low, high = self.sigma_range
        if not 0.0 <= low <= high:
            raise ValueError(f"noise sigma must be >= 0 (a range as low <= high), got {self.sigma}")
        if self.photons is not None and self.photons <= 0:
            raise ValueError(f"photons must be > 0, got {self.photons}")

    @property
    def sigma_range(self) -> tuple[float, float]:
        if isinstance(self.sigma, (tuple, list)):
            return float(self.sigma[0]), float(self.sigma[1])
        return float(self.sigma), float(self.sigma)

    @property
    def is_identity(self) -> bool:
        return self.photons is None and self.sigma_range[1] == 0.0

    def __call__(
        self, inputs: Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator | None = None
    ) -> Tensor:
        """Noisy copy of a normalized NCHW batch; random numbers from ``generator`` (on the batch's device)."""
        if self.is_identity:
            return inputs
        mean_, std_ = (torch.tensor(values, device=inputs.device, dtype=inputs.dtype).view(1, -1, 1, 1) for values in (mean, std))
        sigma = self._per_sample_sigma(len(inputs), inputs, generator)
        gaussian = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        if self.photons is None:
            return inputs + sigma * gaussian / std_
        pixels = (inputs * std_ + mean_).clamp(min=0.0)  # clamp: rounding can leave -1e-8 where a pixel is 0
        shot = torch.poisson(pixels * self.photons, generator=generator) / self.photons
        return (shot + sigma * gaussian - mean_) / std_

    def seeded(self, inputs: Tensor, index: Tensor, mean: Sequence[float], std: Sequence[float], seed: int) -> Tensor:
        """Noise that is a function of ``(seed, sample index)`` only: the same for any batch size, device or model."""
        rows = [
            self(row.unsqueeze(0).cpu(), mean, std, torch.Generator().manual_seed(sample_seed(seed, position)))
            for row, position in zip(inputs, index.tolist())
        ]
        return torch.cat(rows).to(inputs.device)

    def _per_sample_sigma(self, batch: int, like: Tensor, generator: torch.Generator | None) -> Tensor | float:
        low, high = self.sigma_range
        if low == high:
            return low
        uniform = torch.rand(batch, generator=generator, device=like.device, dtype=like.dtype)
        return (low + (high - low) * uniform).view(-1, 1, 1, 1)


def sample_seed(seed: int, position: int) -> int:
    """A generator seed mixed from (seed, sample position).

    torch's CPU generator keeps only 32 bits of a seed, so the pair is hashed
    into 32 bits rather than packed side by side.
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")
