"""The CLI answers --help without importing torch (or any job)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from kdcli.cli import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
heavy = sorted(name for name in ("torch", "timm", "numpy", "kdcli.jobs.train", "kdcli.config") if name in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["teach", "--help"], ["distill", "--help"], ["eval", "--help"], ["sweep-checkpoints", "--help"],
     ["compare", "--help"], ["plot", "--help"], ["export", "--help"], ["methods", "--help"]],
)
def test_help_imports_no_torch(args: list[str]) -> None:
    probe = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "", f"kdcli {' '.join(args)} imported {probe.stdout.strip()}"
