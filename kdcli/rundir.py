"""A run directory's layout and its lifecycle (plan, create, replace, resume).

kdcli deletes only what it created.  A run directory carries a marker file
from the moment it is created; replacing a run (``overwrite``) touches only a
marked directory, and only the files kdcli writes into one.  The new run is
built in a hidden sibling directory and takes the old one's place once it has
saved its first training state, so a replacement that fails early leaves the
old run as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.errors import UsageError
from kdcli.files import TEMPORARY_PATTERN, atomic_write_bytes, check_target
from kdcli.teacher_cache import CACHE_FOLDER

MARKER = ".kdcli-run"  # written first into every run directory kdcli creates
OWNED_FILES = (
    "config.json", "metrics.jsonl", "summary.json", "last.safetensors", "best.safetensors", "resume.safetensors", "resume-epoch.safetensors",
    "ema.safetensors",
)
CHECKPOINT_PATTERN = "epoch_[0-9][0-9][0-9][0-9].safetensors"


class RunDirExists(UsageError):
    """A new run was asked for in a directory that already holds files."""


@dataclass
class RunDir:
    """``config.json``, ``metrics.jsonl``, ``summary.json``, ``last.safetensors``, ``best.safetensors``, ``ema.safetensors``, ``resume.safetensors``, ``checkpoints/``.

    ``replaces`` is set while this run is staged beside the run it will replace.
    """

    root: Path
    replaces: Path | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last_path(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def ema_path(self) -> Path:
        """The student's EMA (``--ema``), a checkpoint like ``last.safetensors``."""
        return self.root / "ema.safetensors"

    @property
    def resume_path(self) -> Path:
        return self.root / "resume.safetensors"

    @property
    def boundary_resume_path(self) -> Path:
        """The last epoch boundary's resume state, kept while ``resume_path`` holds a state inside the next epoch."""
        return self.root / "resume-epoch.safetensors"

    @property
    def summary_path(self) -> Path:
        """Written once training finished: the job's summary (``kdcli compare`` reads it)."""
        return self.root / "summary.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"epoch_{epoch:04d}.safetensors"

    def saved_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints_dir.glob(CHECKPOINT_PATTERN))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.config_path, (json.dumps(config, indent=2) + "\n").encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.summary_path, (json.dumps(summary, indent=2) + "\n").encode())

    def write_history(self, records: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` whole, so it always matches the resume state."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        atomic_write_bytes(self.metrics_path, text.encode())

    def remove_partial_writes(self) -> None:
        """Delete kdcli's temporary files of writes that a crash cut short (the files they were for are whole)."""
        for folder in (self.root, self.checkpoints_dir):
            for leftover in folder.glob(TEMPORARY_PATTERN):
                leftover.unlink(missing_ok=True)

    def read_history(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def create(self) -> None:
        """Make the directory and mark it as kdcli's; a replacement is staged in a hidden sibling."""
        if self.replaces is not None:
            self.root = Path(tempfile.mkdtemp(prefix=f".{self.replaces.name}.", suffix=".kdcli-new", dir=self.replaces.parent))
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / MARKER, b'{"format": "kdcli-run"}\n')

    def saved_state(self) -> None:
        """Called after every state write: the first one puts a staged run in place of the run it replaces."""
        if self.replaces is None:
            return
        target, staging = self.replaces, self.root
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".kdcli-old", dir=target.parent))
        for relative in owned_entries(target):
            _move(target / relative, trash / relative)
        for entry in staging.iterdir():
            _move(entry, target / entry.name)
        staging.rmdir()
        shutil.rmtree(trash)  # holds only the old run's own files, moved there above
        self.root, self.replaces = target, None

    def discard_staged(self) -> None:
        """Remove a staged replacement that never saved a state: the old run stays as it was."""
        if self.replaces is not None and self.root.is_dir():
            shutil.rmtree(self.root)  # a directory kdcli made with mkdtemp, holding only its own files
            self.root, self.replaces = self.replaces, None


def _move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; a directory is merged into an existing one entry by entry."""
    if source.is_dir() and target.is_dir():
        for entry in source.iterdir():
            _move(entry, target / entry.name)
        source.rmdir()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def is_kdcli_run(root: Path) -> bool:
    return (root / MARKER).is_file()


def owned_entries(root: Path) -> list[Path]:
    """The paths, relative to ``root``, of what kdcli wrote into a run directory; anything else is the user's."""
    names = [MARKER, *OWNED_FILES, CACHE_FOLDER]
    entries = [Path(name) for name in names if (root / name).exists()]
    entries += [path.relative_to(root) for path in (root / "checkpoints").glob(CHECKPOINT_PATTERN)]
    entries += [path.relative_to(root) for folder in (root, root / "checkpoints") for path in folder.glob(TEMPORARY_PATTERN)]
    return entries


def plan_run_dir(root: Path, *, overwrite: bool, reads: tuple[Path, ...] = ()) -> RunDir:
    """Where a new run goes, decided without touching the disk; ``RunDir.create`` then makes it.

    An existing non-empty directory is refused unless ``overwrite``, and even
    then unless it is a kdcli run that holds none of the files the run
    ``reads`` and is not the working directory.
    """
    if root.exists() and not root.is_dir():
        raise UsageError(f"run directory {root} exists and is not a directory")
    check_creatable(root)
    if not (root.exists() and any(root.iterdir())):
        return RunDir(root)
    if not overwrite:
        raise RunDirExists(f"run directory {root} already exists")
    check_replaceable(root, reads)
    return RunDir(root, replaces=root)


def check_creatable(root: Path) -> None:
    """``root`` can be made (or written in), checked the way the run will: a folder made and removed in its nearest
    existing ancestor.  Permission bits do not tell (root passes them; /proc and read-only mounts refuse anyway)."""
    ancestor = next(path for path in (root, *root.absolute().parents) if path.exists())
    if not ancestor.is_dir():
        raise UsageError(f"cannot create run directory {root}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kdcli-probe-", dir=ancestor))
    except OSError as exc:
        raise UsageError(f"cannot create run directory {root}: {exc.strerror or exc} in {ancestor}") from None


def check_replaceable(root: Path, reads: tuple[Path, ...], *, marker: str = MARKER) -> None:
    """Refuse to replace the working directory, a directory kdcli did not create, or one holding an input."""
    where = root.resolve()
    if Path.cwd().resolve().is_relative_to(where):
        raise UsageError(f"refusing to replace {root}: it is or contains the working directory")
    for path in reads:
        if path.resolve().is_relative_to(where):
            raise UsageError(f"refusing to replace {root}: this run reads {path}, which is inside it")
    if not (root / marker).is_file():
        raise UsageError(f"refusing to replace {root}: kdcli did not create it (no {marker}); kdcli deletes only what it created")


def remove_run(root: Path) -> None:
    """Delete kdcli's files from a run directory, and the directory once nothing of the user's is left."""
    for relative in sorted(owned_entries(root), key=lambda path: len(path.parts), reverse=True):
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for folder in (root / "checkpoints", root):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def existing_run_dir(root: Path) -> RunDir:
    """A run directory to resume: it must hold a config (a resume state only once an epoch was saved)."""
    run_dir = RunDir(root)
    if not run_dir.config_path.is_file():
        raise UsageError(f"cannot resume {root}: not a kdcli run directory (no config.json)")
    for name in OWNED_FILES:  # the files the resumed run rewrites: a link among them is refused now, not epochs later
        check_target(root / name)
    return run_dir
