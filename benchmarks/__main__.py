"""``python -m benchmarks [--smoke] [NAME ...]``: run every ``bench_*`` module (or the named ones).

``--smoke`` runs each at a tiny size (the test suite does, so no benchmark can rot unseen). A
benchmark that fails prints one line and the others go on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

from benchmarks.common import SMOKE_ENV


def main(arguments: list[str]) -> int:
    if "--smoke" in arguments:
        os.environ[SMOKE_ENV] = "1"  # before any benchmark module reads its sizes
    selected = [argument for argument in arguments if argument != "--smoke"]
    import benchmarks
    from benchmarks.common import machine

    print(f"machine: {machine()}", flush=True)
    names = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name.startswith("bench_"))
    failed = []
    for name in names:
        if selected and name.removeprefix("bench_") not in selected and name not in selected:
            continue
        try:
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})", flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
