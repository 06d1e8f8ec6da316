"""``python -m benchmarks [NAME ...]``: run every ``bench_*`` module (or the named ones)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import benchmarks
from benchmarks.common import machine


def main(selected: list[str]) -> None:
    print(f"machine: {machine()}", flush=True)
    names = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name.startswith("bench_"))
    for name in names:
        if selected and name.removeprefix("bench_") not in selected and name not in selected:
            continue
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
