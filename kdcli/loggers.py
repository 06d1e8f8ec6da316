"""Experiment trackers as plugins: the ``kdcli.loggers`` entry-point group.

A logger is a ``RunLogger`` subclass registered under a name (``tensorboard``,
``wandb``, ``mlflow`` are built in and register like any third-party one).
Each receives the resolved config once (``start``), every finished epoch's
record (``log_epoch``) and the job's summary (``finish``; None when the run
stopped early).  A resumed run opens a new run in each tracker and logs the
epochs trained after the resume.

Loggers run on a background thread, so a slow tracker never slows training,
and each is isolated: one that fails (a missing package, a server that is
down) is reported in one line and switched off for the rest of the run;
training goes on.  Import the tracker's package inside ``start``, not at
module level, so that naming the logger never fails for a missing package.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kdcli.errors import first_line
from kdcli.results import flatten

FINISH_TIMEOUT_S = 120.0  # how long the end of a run waits for slow trackers


@dataclass(frozen=True)
class LoggerRun:
    """What a logger is told about the run when it starts."""

    run_dir: Path
    name: str  # the run's name in the tracker (default: the run directory's name)
    project: str  # W&B project, MLflow experiment
    config: dict[str, Any]  # the resolved config, as saved in config.json
    resumed: bool


class RunLogger:
    """Base class of a ``kdcli.loggers`` plugin; override the three hooks."""

    # The kdcli extra that installs what this logger needs, named in its failure message.
    extra: ClassVar[str] = ""

    def start(self, run: LoggerRun) -> None:
        """Open the tracker's run and record the config."""

    def log_epoch(self, epoch: int, metrics: dict[str, float], record: dict[str, Any]) -> None:
        """One finished epoch: ``metrics`` is ``record`` flattened to ``section/name`` numbers."""

    def finish(self, summary: dict[str, Any] | None) -> None:
        """The job's summary (test metrics included), or None when the run stopped early; close the tracker's run."""


def epoch_numbers(record: dict[str, Any]) -> dict[str, float]:
    """An epoch record's numbers, flattened (``loss/kd``, ``method/alpha_mean``), the epoch itself left out."""
    return {key: value for key, value in flatten(record).items() if key != "epoch"}


Warn = Callable[[str], None]


class _Isolated:
    """One logger: its first failure is reported once and switches it off."""

    def __init__(self, name: str, factory: Callable[[], RunLogger], warn: Warn) -> None:
        self.name, self.warn = name, warn
        self.logger: RunLogger | None = None
        self.factory: Callable[[], RunLogger] | None = factory

    def call(self, hook: str, *args: Any) -> None:
        try:
            if self.factory is not None:
                factory, self.factory = self.factory, None  # made once, even when making it fails
                self.logger = factory()
            if self.logger is not None:
                getattr(self.logger, hook)(*args)
        except Exception as exc:  # a tracker must never stop training
            extra = getattr(self.logger, "extra", "")
            hint = f"; pip install 'kdcli[{extra}]'" if isinstance(exc, ImportError) and extra else ""
            self.warn(f"warning: logger {self.name!r} failed in {hook} and is off for this run: {type(exc).__name__}: {first_line(exc)}{hint}")
            self.logger = None


class LoggerHub:
    """Feeds every logger from one background thread, in order; ``close`` waits for them (bounded)."""

    def __init__(self, factories: dict[str, Callable[[], RunLogger]], warn: Warn) -> None:
        self.loggers = [_Isolated(name, factory, warn) for name, factory in factories.items()]
        self.warn = warn
        self.events: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="kdcli-loggers", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (event := self.events.get()) is not None:
            hook, args = event
            for logger in self.loggers:
                logger.call(hook, *args)

    def start(self, run: LoggerRun) -> None:
        self.events.put(("start", (run,)))

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.events.put(("log_epoch", (int(record["epoch"]), epoch_numbers(record), record)))

    def finish(self, summary: dict[str, Any] | None) -> None:
        self.events.put(("finish", (summary,)))

    def close(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """Stop the thread once the queued events are handled; a tracker still busy after ``timeout`` is left behind."""
        self.events.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            names = ", ".join(logger.name for logger in self.loggers)
            self.warn(f"warning: loggers ({names}) still busy after {timeout:.0f} s; left behind, the run itself is complete")
