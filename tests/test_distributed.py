"""torchrun with 2 CPU processes (gloo) reaches the weights of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from conftest import TINY

# test_vit normalizes per sample (LayerNorm), and the synthetic data set has no random
# augmentation, so sharding a global batch over ranks changes nothing but summation order.
RUN = ["teach", "--model", "test_vit", "--epochs", "2", "--lr", "0.01", "--set", "train.deterministic=true", *TINY]


def run_kdcli(args: list[str], out: Path, processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([*launcher, "-m", "kdcli", *args, "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summaries = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) <= 1, "only rank 0 prints the summary"


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    run_kdcli(RUN, tmp_path / "one", processes=1)
    run_kdcli(RUN, tmp_path / "two", processes=2)
    one = safetensors.torch.load_file(tmp_path / "one" / "last.safetensors")
    two = safetensors.torch.load_file(tmp_path / "two" / "last.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    first = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(first, second, strict=True):
        assert abs(a["loss"]["total"] - b["loss"]["total"]) < 1e-4  # metrics are reduced over ranks
        assert a["val_top1"] == b["val_top1"]
