"""The built-in data sets, registered under the ``kdcli.datasets`` entry-point group.

A data-set entry point is a callable ``(config: DataConfig, argument: str | None)
-> DataBundle``; ``argument`` is what follows the colon in ``--data NAME:ARG``.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.config import DataConfig
from kdcli.data.bundle import DataBundle
from kdcli.data.synthetic import make_synthetic
from kdcli.data.vision import load_cifar, load_imagefolder
from kdcli.errors import UsageError


def _no_argument(name: str, argument: str | None) -> None:
    if argument:
        raise UsageError(f"--data {name} takes no ':' argument (got {name}:{argument})")


def synthetic(config: DataConfig, argument: str | None) -> DataBundle:
    _no_argument("synthetic", argument)
    return make_synthetic(**config.synthetic.model_dump())


def cifar10(config: DataConfig, argument: str | None) -> DataBundle:
    _no_argument("cifar10", argument)
    return load_cifar(config.root, num_classes=10, download=config.download)


def cifar100(config: DataConfig, argument: str | None) -> DataBundle:
    _no_argument("cifar100", argument)
    return load_cifar(config.root, num_classes=100, download=config.download)


def imagefolder(config: DataConfig, argument: str | None) -> DataBundle:
    if not argument:
        raise UsageError("--data imagefolder needs a path: --data imagefolder:PATH (with train/ and val/ inside)")
    return load_imagefolder(Path(argument), image_size=config.image_size)
