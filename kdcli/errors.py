"""The one exception type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class KdcliError(Exception):
    """A failure the user can act on: printed as one line, never as a traceback.

    ``exit_code`` follows the CLI convention: 2 for a wrong invocation (bad
    flag value, unknown name), 1 for a runtime failure (a broken file, a crash).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(KdcliError):
    """A wrong invocation: unknown names, invalid values, conflicting flags."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
