"""What the fault-injection tests share: run settings, one case per method, and comparing two runs bit for bit."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from conftest import TINY
from kdcli.checkpoint import load_state, read_checkpoint_info
from kdcli.registry import method_plugins

# Deterministic on CPU, with random augmentation (so RNG state matters) and best-epoch selection (so best.safetensors is written).
DETERMINISTIC = [
    "--model", "cifar_resnet8", "--set", "train.deterministic=true", "--set", "data.rotation=10",
    "--set", "train.keep_best=true", *TINY,
]
TIMINGS = ("time_s", "samples_per_s", "elapsed")


@dataclass(frozen=True)
class MethodCase:
    """How a method trains: ``teach`` if it can, else ``distill``, with a teacher where it uses one."""

    method: str
    job: str
    needs_teacher: bool

    def args(self, teacher_run: Path) -> list[object]:
        teacher = ["--teacher", teacher_run / "last.safetensors"] if self.needs_teacher else []
        return [self.job, "--method", self.method, *teacher]


def method_cases() -> list[MethodCase]:
    """One case per registered method, so every method merged later is covered without editing tests."""
    cases = []
    for plugin in method_plugins():
        method = plugin.loaded
        if plugin.error is not None:
            continue  # a broken plugin fails `kdcli methods list` tests, not these
        job = "teach" if "teach" in method.roles else "distill"
        needs_teacher = method.teacher_use == "required" or (method.teacher_use == "optional" and job == "distill")
        cases.append(MethodCase(plugin.name, job, needs_teacher))
    return cases


def assert_same_run(expected: Path, actual: Path) -> None:
    """Same training in both run directories: every tensor of every checkpoint and of the
    resume state (optimizer and method state included), same metrics apart from timings."""
    for name in ("last.safetensors", "best.safetensors"):
        assert (expected / name).exists() == (actual / name).exists(), name
        if (expected / name).exists():
            assert_same_checkpoint(expected / name, actual / name)
    saved = sorted(path.name for path in (expected / "checkpoints").iterdir())
    assert saved == sorted(path.name for path in (actual / "checkpoints").iterdir())
    for name in saved:
        assert_same_checkpoint(expected / "checkpoints" / name, actual / "checkpoints" / name)
    assert_same_tree(load_state(expected / "resume.safetensors"), load_state(actual / "resume.safetensors"))
    assert _metrics(expected) == _metrics(actual)


def assert_same_checkpoint(expected: Path, actual: Path) -> None:
    assert_same_tree(safetensors.torch.load_file(expected), safetensors.torch.load_file(actual), expected.name)
    expected_info, actual_info = read_checkpoint_info(expected), read_checkpoint_info(actual)
    assert expected_info.epoch == actual_info.epoch, expected.name
    assert _without_timings(expected_info.metrics) == _without_timings(actual_info.metrics), expected.name


def assert_same_tree(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype, where
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), where
        expected, actual = _without_timings(expected), _without_timings(actual)
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tree(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(expected) == len(actual), where
        for index, (left, right) in enumerate(zip(expected, actual)):
            assert_same_tree(left, right, f"{where}/{index}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), where
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def _without_timings(mapping: dict[Any, Any]) -> dict[Any, Any]:
    return {key: value for key, value in mapping.items() if key not in TIMINGS}


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [_without_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_error_line(stderr: str) -> str:
    """The single ``kdcli: error:`` line a failure must print, and nothing else (no traceback).

    One-line ``warning:`` notes printed before the failure (a weak teacher) are not part of it.
    """
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: "), stderr
    return lines[0]
