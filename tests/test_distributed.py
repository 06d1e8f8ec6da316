"""torchrun with 2 CPU processes (gloo) reaches the weights of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

from conftest import TINY
from kdcli.checkpoint import load_state, read_state_label

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


# feature-mimic trains 1x1-conv connectors (test_vit's 64 channels to cifar_resnet14's 16) inside the one
# DDP-wrapped module: without noise, 2 processes reach the 1-process weights, connectors included.
FEATURE_MIMIC = [
    "distill", "--method", "feature-mimic", "--model", "test_vit", "--epochs", "2", "--lr", "0.01",
    "--set", "method.noise_std=0", "--set", "method.layers=[1,2]", "--set", "method.kd_weight=0.5",
    "--set", "train.deterministic=true", *TINY,
]


def test_two_processes_train_connectors_like_one(teacher_run: Path, tmp_path: Path) -> None:
    args = [*FEATURE_MIMIC, "--teacher", str(teacher_run / "last.safetensors")]
    run_kdcli(args, tmp_path / "two", processes=2)
    run_kdcli(args, tmp_path / "one", processes=1)
    one, two = (load_state(tmp_path / run / "resume.safetensors") for run in ("one", "two"))
    connectors = {name: value for name, value in one["method"].items() if name.startswith("connectors.")}
    assert any(name.endswith("project.weight") for name in connectors)  # real connectors, not identities
    for name, value in connectors.items():  # used outside DDP's forward, reduced by its backward all the same
        torch.testing.assert_close(two["method"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_adaptive_fusion_trains_under_two_processes(teacher_run: Path, tmp_path: Path) -> None:
    args = ["distill", "--method", "adaptive-fusion", "--model", "test_vit", "--epochs", "1", *TINY]
    run_kdcli([*args, "--teacher", str(teacher_run / "last.safetensors")], tmp_path / "two", processes=2)
    record = read_metrics(tmp_path / "two")[-1]
    assert record["method"]["meta_val_ce"] > 0  # the fusion network was trained on the held-out split
    assert 0.0 < record["method"]["alpha_mean"] < 1.0 and torch.isfinite(torch.tensor(record["loss"]["total"]))


# test_vit at a global batch of 8: 27 steps an epoch, so the processes compare notes (every 10 steps) inside it.
PREEMPTED = [
    "teach", "--model", "test_vit", "--epochs", "2", "--lr", "0.01", "--set", "train.deterministic=true",
    "--set", "data.crop_padding=2", "--set", "data.hflip=true", *TINY, "--batch-size", "8", "--set", "data.synthetic.num_train=240",
]


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_on_one_rank_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path: Path) -> None:
    run_kdcli(PREEMPTED, tmp_path / "straight", processes=2)
    launcher_command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([*launcher_command, *PREEMPTED, "--out", str(tmp_path / "stopped")], env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(worker_of_rank(launcher, 1), signal.SIGTERM)  # a preempted node: one rank hears it
    stderr = launcher.communicate(timeout=240)[1]
    # Each rank's own report is one line (torchrun then reports the exit code 143 of its workers in its own words).
    lines = [line for line in stderr.splitlines() if line.startswith("kdcli: error: ")]
    assert lines and all("terminated (SIGTERM): saved the exact training state after step" in line for line in lines), stderr[-3000:]
    label = read_state_label(tmp_path / "stopped" / "resume.safetensors")
    assert label.endswith("of epoch 2") and int(label.split()[1].split("/")[0]) % 10 == 0, label
    shutil.copytree(tmp_path / "stopped", tmp_path / "one-process")
    one_process = subprocess.run([sys.executable, "-m", "kdcli", "teach", "--resume", str(tmp_path / "one-process")], capture_output=True, text=True, env=env)
    assert one_process.returncode == 0 and "saved by 2 processes and this run has 1: resuming from the last epoch boundary" in one_process.stderr
    assert len(read_metrics(tmp_path / "one-process")) == 2 and not (tmp_path / "one-process" / "resume-epoch.safetensors").exists()
    completed = subprocess.run([*launcher_command, "teach", "--resume", str(tmp_path / "stopped")], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    straight = safetensors.torch.load_file(tmp_path / "straight" / "last.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "stopped" / "last.safetensors")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert [record["loss"] for record in read_metrics(tmp_path / "straight")] == [record["loss"] for record in read_metrics(tmp_path / "stopped")]
