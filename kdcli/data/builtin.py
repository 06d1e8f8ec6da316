"""The built-in data sets, registered under the ``kdcli.datasets`` entry-point group.

A data-set entry point is a callable ``(request: DataRequest) -> DataBundle``;
``request.argument`` is what follows the colon in ``NAME:ARG``.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.data.bundle import DataBundle, DataRequest
from kdcli.data.synthetic import make_synthetic
from kdcli.data.vision import load_cifar, load_imagefolder
from kdcli.errors import UsageError


def _no_argument(name: str, argument: str | None) -> None:
    if argument:
        raise UsageError(f"data set {name} takes no ':' argument (got {name}:{argument})")


def synthetic(request: DataRequest) -> DataBundle:
    _no_argument("synthetic", request.argument)
    return make_synthetic(**request.synthetic, holdout=(request.val_split, request.split_seed))


def cifar10(request: DataRequest) -> DataBundle:
    _no_argument("cifar10", request.argument)
    return load_cifar(request.root, num_classes=10, download=request.download)


def cifar100(request: DataRequest) -> DataBundle:
    _no_argument("cifar100", request.argument)
    return load_cifar(request.root, num_classes=100, download=request.download)


def imagefolder(request: DataRequest) -> DataBundle:
    if not request.argument:
        raise UsageError("data set imagefolder needs a path: imagefolder:PATH (with train/ and val/ inside)")
    return load_imagefolder(Path(request.argument), image_size=request.image_size, **request.streaming)
