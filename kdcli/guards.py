"""What may end training early: a non-finite loss, or a stop signal."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kdcli.errors import KdcliError
from kdcli.step import StepOutput

STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class NonFiniteLoss(KdcliError):
    """A loss term became NaN or infinite and ``train.nonfinite_loss`` is ``stop``."""


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while training.

    The first one only records itself: the loop finishes the running step,
    saves an exact resume state and ends the run.  A second one raises
    ``KeyboardInterrupt`` at once; files on disk stay whole because every
    write is atomic.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def describe(self) -> str:
        """``interrupted (SIGINT)``: what was received."""
        assert self.received is not None
        return f"{STOP_SIGNALS[self.received]} ({signal.Signals(self.received).name})"

    @contextmanager
    def caught(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        # A signal ignored since start-up (``nohup``, a ``cmd &`` job of a script) stays ignored, as Unix programs do.
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def finite_flags(output: StepOutput) -> Tensor:
    """One flag per loss term (``total`` included), still on the device."""
    return torch.stack([torch.isfinite(value.detach()).all() for value in output.losses.values()])


class FiniteWatch:
    """Loss terms' finiteness, read on the device's schedule (one sync per check), not every step."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, list[str], Tensor]] = []  # (step, loss names, finite flags)

    def watch(self, step: int, output: StepOutput) -> None:
        self.pending.append((step, list(output.losses), finite_flags(output)))

    def first_bad(self) -> tuple[int, list[str]] | None:
        """The first watched step with a non-finite term and those terms' names; forgets what it read."""
        pending, self.pending = self.pending, []
        if not pending:
            return None
        flags = iter(torch.cat([finite for _, _, finite in pending]).tolist())
        for step, names, _ in pending:
            bad = [name for name in names if not next(flags)]
            if bad:
                return step, bad
        return None


def nonfinite_message(epoch: int, steps: int, first_bad: tuple[int, list[str]] | None) -> str:
    """What went non-finite where; None for ``first_bad`` means another process saw it."""
    if first_bad is None:
        return f"a loss term went non-finite in another process in epoch {epoch}"
    step, names = first_bad
    terms = [name for name in names if name != "total"] or ["total"]  # total alone: the sum overflowed
    noun = "terms" if len(terms) > 1 else "term"
    return f"loss {noun} {', '.join(terms)} went non-finite (NaN or inf) in epoch {epoch} at step {step}/{steps}"
