"""The one exception type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResumeHint:
    """Facts for the line that tells the user how to continue a stopped run (the CLI words it)."""

    job: str
    run_dir: Path
    lead: str = "continue with"


class KdcliError(Exception):
    """A failure the user can act on: printed as one line, never as a traceback.

    ``exit_code`` follows the CLI convention: 2 for a wrong invocation (bad
    flag value, unknown name), 1 for a runtime failure (a broken file, a crash).
    """

    def __init__(self, message: str, *, exit_code: int = 1, resume: ResumeHint | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.resume = resume


class UsageError(KdcliError):
    """A wrong invocation: unknown names, invalid values, conflicting flags."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def unknown_name(kind: str, name: str, known: list[str]) -> UsageError:
    """``unknown method 'kdd'; did you mean kd?`` — the closest names, or the short list."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    elif len(known) <= 12:
        hint = f"; known: {', '.join(sorted(known))}"
    else:
        hint = ""
    return UsageError(f"unknown {kind} {name!r}{hint}")


MAX_MESSAGE = 400  # characters of a value or foreign message quoted in one error line


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with its whitespace runs (newlines too) made single spaces, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for errors that must stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
