"""What training prints while it runs: a progress bar per epoch, a line per epoch, notes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PROGRESS_REFRESH_STEPS = 10
# With stderr in a pipe or a log (no bar), one plain progress line at most this often within an epoch.
PIPED_PROGRESS_SECONDS = 30.0


class TrainingConsole:
    """stderr output of one process; silent unless ``enabled`` (rank 0, not ``--quiet``)."""

    def __init__(self, *, enabled: bool) -> None:
        self.console = Console(stderr=True, quiet=not enabled)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def epoch_done(self, record: dict[str, Any], epochs: int, sections: Sequence[str] = ()) -> None:
        """The epoch's line; ``sections`` name record entries (an observer's numbers) shown after it."""
        self.console.print(epoch_line(record, epochs, sections), markup=False, highlight=False)

    def epoch_bar(self, epoch: int, epochs: int, steps: int, done: int) -> EpochProgress:
        return EpochProgress(self.console, epoch, epochs, steps, done)


def epoch_line(record: dict[str, Any], epochs: int, sections: Sequence[str] = ()) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']['total']:.4f}", f"train {record['train_top1']:.3f}"]
    if "val_top1" in record:
        parts.append(f"val {record['val_top1']:.3f}")
    parts += [f"lr {record['lr']:.4g}", f"{record['time_s']:.1f}s"]
    for name in sections:
        numbers = " ".join(f"{key} {_number(key, value)}" for key, value in record.get(name, {}).items())
        parts.append(f"{name}: {numbers}")
    return "  ".join(parts)


def _number(key: str, value: Any) -> str:
    if key.endswith("bytes"):
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class EpochProgress:
    """A transient rich progress bar for one epoch, with running loss and accuracy.

    Where stderr is not a terminal the bar is off (it would fill a log with
    redraws); instead a plain line reports the step every PIPED_PROGRESS_SECONDS.
    """

    def __init__(self, console: Console, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.console, self.label, self.steps = console, f"epoch {epoch}/{epochs}", steps
        self.piped = not console.quiet and not console.is_terminal
        self.started = self.last_line = time.monotonic()
        self.progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console.quiet or not console.is_terminal,  # no bar (nor blank lines) in logs
        )
        self.task = self.progress.add_task("train", total=steps, completed=done, status="")

    def __enter__(self) -> EpochProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.__exit__(*exc_info)

    def advance(self, step: int, loss: float, accuracy: float) -> None:
        status = f"loss {loss:.4f} acc {accuracy:.3f}"
        self.progress.update(self.task, completed=step, status=status)
        now = time.monotonic()
        if self.piped and step < self.steps and now - self.last_line >= PIPED_PROGRESS_SECONDS:
            self.last_line = now  # the epoch's own line follows its last step
            line = f"{self.label}  step {step}/{self.steps}  {status}  {now - self.started:.0f}s"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
