"""The ``kdcli`` entry point: Ctrl-C at any moment ends in one line and exit code 130.

It imports the CLI itself, holding an interrupt during the seconds torch takes
to import until the import is whole, and after the command it keeps one for the teardown
(flushing, freeing torch), where Python would otherwise die of the signal.

Started with SIGINT ignored (``nohup``, a ``cmd &`` job of a non-interactive
shell), kdcli leaves it ignored, as Unix programs do; SIGTERM still stops
training with an exact resume state.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTED = 130
LINE = b"kdcli: error: interrupted\n"


def _interrupted(signum: int, frame: FrameType | None) -> None:
    os.write(2, LINE)
    os._exit(INTERRUPTED)  # the command has ended; only the interpreter's teardown is cut short


def main() -> None:
    with _interrupts_held() as received:
        from kdcli.cli import app  # torch, timm, pydantic: seconds of import
    if received:
        os.write(2, LINE)
        raise SystemExit(INTERRUPTED)
    try:
        app(prog_name="kdcli")
    except KeyboardInterrupt:
        os.write(2, LINE)
        raise SystemExit(INTERRUPTED) from None
    finally:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted)


@contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Hold Ctrl-C until the block ends: interrupting an import half-way leaves modules that fail later, elsewhere."""
    received: list[int] = []
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored: kdcli leaves it so
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
