"""One rule for every file kdcli writes.

A file is written to a temporary file in the target's own folder, fsynced, then
renamed over the target, so a crash leaves the old file or the new one, never
half.  The target is checked first (``check_target``): a symbolic link is never
written through or replaced, something that is not a regular file is refused,
and so is a file the same command reads.  Which existing files a command may
replace is its own record's decision (a run directory's marker, a seed group's
index, an export folder's manifest, a plot's PNG tag); this module only writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from kdcli.errors import KdcliError, UsageError, first_line

TEMPORARY_SUFFIX = ".kdcli.tmp"  # names kdcli's own temporary files apart from a user's *.tmp
TEMPORARY_PATTERN = f".*{TEMPORARY_SUFFIX}"  # what an interrupted atomic write can leave behind


class WriteFailed(KdcliError):
    """A file could not be written (disk full, no permission, ...); the message says what is left on disk."""


def check_target(path: Path, *, reads: Iterable[Path] = ()) -> None:
    """The rule every write follows, checked before any work: never through a symlink, never over something
    that is not a regular file, never onto a file the same command reads."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {_reason(exc)}") from None
    if stat.S_ISLNK(mode):
        raise UsageError(f"refusing to write {path}: it is a symbolic link, and kdcli never writes through one")
    if not stat.S_ISREG(mode):
        raise UsageError(f"refusing to write {path}: it exists and is not a regular file")
    for source in reads:
        with contextlib.suppress(OSError):
            if path.samefile(source):
                raise UsageError(f"refusing to write {path}: this command reads it ({source})")


def require_regular_file(path: Path, what: str) -> None:
    """Refuse to read a FIFO, device or socket (opening one blocks or never ends) or a missing file, before opening it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KdcliError(f"cannot read {what} {path}: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise KdcliError(f"refusing {what} {path}: not a regular file (a FIFO, device or folder)")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (how a manifest recognises a file kdcli wrote)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes, *, reads: Iterable[Path] = ()) -> None:
    """Write ``payload`` to ``path`` so that readers see the old or the new file, never half.

    ``check_target`` runs again here, so a link or a read file that appeared since the command's own checks
    is still refused; the rename replaces the directory entry, never what a link points to.
    """
    check_target(path, reads=reads)
    had_previous = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _write_failed(path, exc, had_previous) from None
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp makes 0600; a file kdcli keeps follows the umask like open() would
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc, had_previous) from None
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise WriteFailed(f"wrote {path} but could not flush its directory to disk ({_reason(exc)})") from None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return mask


def _write_failed(path: Path, exc: OSError, had_previous: bool) -> WriteFailed:
    kept = f"the previous {path.name} is unchanged" if had_previous else "nothing was written"
    return WriteFailed(f"cannot write {path} ({_reason(exc)}); {kept}")


def _reason(exc: OSError) -> str:
    return exc.strerror or first_line(exc)
