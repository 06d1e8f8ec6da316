"""torchrun with 2 CPU processes (gloo) reaches the weights of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from conftest import TINY

# test_vit normalizes per sample (LayerNorm), and augmentation is replayable (sample i's
# crop and flip depend on seed, epoch and i only), so sharding a global batch over ranks
# changes nothing but summation order. The teacher's logits are cached: the 2-process run
# computes them on both ranks and merges them into per-epoch tables, which the 1-process
# run then reads instead of running the teacher.
RUN = [
    "distill", "--model", "test_vit", "--epochs", "2", "--lr", "0.01", "--cache-teacher",
    "--set", "train.deterministic=true", "--set", "data.crop_padding=2", "--set", "data.hflip=true", *TINY,
]


def run_kdcli(args: list[str], out: Path, processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([*launcher, "-m", "kdcli", *args, "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summaries = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) <= 1, "only rank 0 prints the summary"


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(teacher_run: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "last.safetensors", teacher)
    args = [*RUN, "--teacher", str(teacher)]
    run_kdcli(args, tmp_path / "two", processes=2)
    run_kdcli(args, tmp_path / "one", processes=1)
    one = safetensors.torch.load_file(tmp_path / "one" / "last.safetensors")
    two = safetensors.torch.load_file(tmp_path / "two" / "last.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    first, second = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(first, second, strict=True):
        assert abs(a["loss"]["total"] - b["loss"]["total"]) < 1e-4  # metrics are reduced over ranks
        assert a["val_top1"] == b["val_top1"]
        assert b["teacher_cache"]["hits"] == 0 and a["teacher_cache"]["computed"] == 0  # tables merged over ranks
