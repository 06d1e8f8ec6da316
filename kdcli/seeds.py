"""The seed streams of a run: one per (seed, epoch, rank), and one for augmentation shared by every rank."""

from __future__ import annotations

AUGMENTATION_STREAM = 2**40  # keeps augmentation seeds apart from every rank's epoch_seed


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct, reproducible seed per (run seed, epoch, rank): resuming at an epoch replays it."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


def augmentation_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's augmentation draws: the same on every rank, so DDP sees the 1-process views.

    Changing this changes what cached teacher tables mean: bump ``kdcli.teacher_cache.CACHE_FORMAT``.
    """
    return epoch_seed(seed, epoch, AUGMENTATION_STREAM)
