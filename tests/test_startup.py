"""The CLI answers --help and lists methods without importing torch (or any job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from pathlib import Path
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
     ["compare", "--help"], ["plot", "--help"], ["export", "--help"], ["methods", "--help"], ["methods", "list"], ["methods", "list", "--json"]],
)
def test_help_imports_no_torch(args: list[str]) -> None:
    probe = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "", f"kdcli {' '.join(args)} imported {probe.stdout.strip()}"


ERROR_PROBE = """
import sys
from pathlib import Path
from kdcli.cli import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, sys.argv[1:])
print(result.exit_code, "torch" in sys.modules, result.stderr.strip())
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teach", "--epochz", "3"], "No such option: --epochz"),
        (["teach", "--set", "train.epochz=3"], "train.epochz: Extra inputs are not permitted"),
        (["distill", "--set", "optim.lr=fast"], "optim.lr: Input should be a valid number"),
        (["distill", "--method", "kdd"], "unknown method 'kdd'"),
    ],
)
def test_flag_and_config_errors_answer_before_torch(args: list[str], message: str, tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", ERROR_PROBE, *args, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    exit_code, imported_torch, error = probe.stdout.split(" ", 2)
    assert (exit_code, imported_torch) == ("2", "False") and error.startswith("kdcli: error:") and message in error, probe.stdout
    assert not (tmp_path / "run").exists()
