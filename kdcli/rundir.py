"""A run directory's layout and its lifecycle (create, refuse, overwrite, resume)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.checkpoint import TEMPORARY_PATTERN, atomic_write_bytes
from kdcli.errors import UsageError


class RunDirExists(UsageError):
    """A new run was asked for in a directory that already holds files."""


@dataclass(frozen=True)
class RunDir:
    """``config.json``, ``metrics.jsonl``, ``summary.json``, ``last.safetensors``, ``best.safetensors``, ``resume.safetensors``, ``checkpoints/``."""

    root: Path

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
    def resume_path(self) -> Path:
        return self.root / "resume.safetensors"

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
        return sorted(self.checkpoints_dir.glob("epoch_[0-9][0-9][0-9][0-9].safetensors"))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.config_path, (json.dumps(config, indent=2) + "\n").encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.summary_path, (json.dumps(summary, indent=2) + "\n").encode())

    def write_history(self, records: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` whole, so it always matches the resume state."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        atomic_write_bytes(self.metrics_path, text.encode())

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a crash cut short (the files they were for are whole)."""
        for folder in (self.root, self.checkpoints_dir):
            for leftover in folder.glob(TEMPORARY_PATTERN):
                leftover.unlink(missing_ok=True)

    def read_history(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


def prepare_run_dir(root: Path, *, overwrite: bool) -> RunDir:
    """A fresh run directory; an existing non-empty one is refused unless ``overwrite``."""
    run_dir = RunDir(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"run directory {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise RunDirExists(f"run directory {root} already exists")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return run_dir


def existing_run_dir(root: Path) -> RunDir:
    """A run directory to resume: it must hold a config (a resume state only once an epoch was saved)."""
    run_dir = RunDir(root)
    if not run_dir.config_path.is_file():
        raise UsageError(f"cannot resume {root}: not a kdcli run directory (no config.json)")
    return run_dir
