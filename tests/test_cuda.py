"""The CUDA paths: precisions, channels_last, torch.compile, the teacher cache, CUDA RNG in resume states, nccl.

Every test here is marked ``cuda`` and skipped without a CUDA device (see
conftest.py); ``make gpu-check`` runs them on a GPU machine.  Runs are tiny
(``TINY``): these tests check that the paths work and are exact where they
must be, not how fast they are (benchmarks/gpu_check.py measures that).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from conftest import TINY, run_cli
from faults import DETERMINISTIC, assert_same_run
from kdcli.checkpoint import load_checkpoint, load_state
from kdcli.config import build_config
from kdcli.engine import Trainer
from kdcli.jobs.build import build_training, resolve_run
from kdcli.jobs.common import load_data, model_from_checkpoint
from kdcli.registry import load_model_plugins
from kdcli.rundir import RunDir
from kdcli.runtime import Runtime, setup_runtime
from test_fault_injection import STEPS_PER_EPOCH, at_global_step, poison_loss

pytestmark = pytest.mark.cuda

CUDA = ["--device", "cuda"]
KD_RUN = ["distill", "--epochs", 2, *CUDA, *DETERMINISTIC]
TRAIN_SAMPLES = 432  # TINY: 480 samples less the 10% validation split


def teacher_copy(teacher_run: Path, tmp_path: Path) -> Path:
    """The session's teacher in a folder of this test's own (the teacher cache writes beside it)."""
    path = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "last.safetensors", path)
    return path


def stop_and_resume(args: list[object], out: Path, monkeypatch: pytest.MonkeyPatch, step_in_epoch: int) -> dict:
    """Run ``args`` with a Ctrl-C inside epoch 2, then resume it; returns the resume state saved at the stop."""
    with monkeypatch.context() as patch:
        at_global_step(patch, STEPS_PER_EPOCH + step_in_epoch, lambda: os.kill(os.getpid(), signal.SIGINT))
        stopped = run_cli(*args, "--out", out)
    assert stopped.exit_code == 130, stopped
    saved = load_state(out / "resume.safetensors")
    finished = run_cli(str(args[0]), "--resume", out, "-q")
    assert finished.exit_code == 0, finished
    return saved


# -- one step and one resumed step per precision ------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resumed_step_is_bit_exact_per_precision(precision: str, teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KD with the teacher on the GPU; fp16 carries the gradient scaler's state through the resume state."""
    args = [*KD_RUN, "--teacher", teacher_run / "last.safetensors", "--set", f"train.precision={precision}"]
    assert run_cli(*args, "--out", tmp_path / "straight").exit_code == 0
    saved = stop_and_resume(args, tmp_path / "resumed", monkeypatch, step_in_epoch=1)
    assert bool(saved["scaler"]) == (precision == "fp16")  # the scaler is on for fp16 only
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    weights, _ = load_checkpoint(tmp_path / "resumed" / "last.safetensors")
    assert all(tensor.dtype != torch.float16 and tensor.dtype != torch.bfloat16 for tensor in weights.values())


def test_cuda_rng_state_goes_through_a_resume(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """feature-mimic draws its input noise from the CUDA generator every step: a resume must restore it."""
    args = [*KD_RUN, "--method", "feature-mimic", "--teacher", teacher_run / "last.safetensors", "--set", "method.noise_std=0.1"]
    assert run_cli(*args, "--out", tmp_path / "straight").exit_code == 0
    saved = stop_and_resume(args, tmp_path / "resumed", monkeypatch, step_in_epoch=4)
    assert saved["position"]["rng"]["cuda"].dtype == torch.uint8
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


# -- channels_last, the teacher cache, torch.compile ----------------------------------------


def test_channels_last_trains_the_same_function(teacher_run: Path, tmp_path: Path) -> None:
    """channels_last only changes memory layout (and so conv algorithms): the weights stay close."""
    args = ["distill", "--epochs", 1, *CUDA, "--teacher", teacher_run / "last.safetensors", *TINY, "--set", "train.precision=fp32"]
    assert run_cli(*args, "--out", tmp_path / "plain").exit_code == 0
    assert run_cli(*args, "--out", tmp_path / "last", "--set", "train.channels_last=true").exit_code == 0
    plain = safetensors.torch.load_file(tmp_path / "plain" / "last.safetensors")
    channels_last = safetensors.torch.load_file(tmp_path / "last" / "last.safetensors")
    for key, value in plain.items():
        torch.testing.assert_close(channels_last[key], value, rtol=0.05, atol=5e-3, msg=key)


def build_trainer(tmp_path: Path, overrides: list[str], *, teacher: Path | None = None, runtime: Runtime | None = None) -> Trainer:
    """What ``kdcli distill``/``teach`` assembles, on the GPU, without the run directory's files."""
    tiny = ["data.synthetic.num_train=480", "data.synthetic.num_test=240", "train.batch_size=48", "train.device=cuda"]
    config = build_config(overrides=[*tiny, *overrides, *([f"teacher={teacher}"] if teacher else [])])
    spec = resolve_run(config)
    load_model_plugins()
    network = model_from_checkpoint(teacher)[0] if teacher else None
    runtime = runtime or setup_runtime(spec.config.train)
    return build_training(spec, load_data(spec.config.data), network, runtime, RunDir(tmp_path / "run"), show_progress=False).trainer


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


COMPILED = ["train.compile=true", "train.channels_last=true", "train.precision=bf16"]


@pytest.mark.parametrize(
    "overrides",
    [["job=teach", "method.name=standard", "model.name=cifar_resnet8"], ["job=distill", "method.name=feature-mimic", "model.name=cifar_resnet8x4", "method.layers=[1,2]", "method.kd_weight=0.5"]],
    ids=["teach", "feature-mimic"],
)
def test_compiled_step_does_not_recompile_in_later_epochs(overrides: list[str], teacher_run: Path, tmp_path: Path) -> None:
    """The student and feature-mimic's connectors (1x1 convs: resnet8x4 has 4x the teacher's channels) are one
    compiled module; epoch 2 reuses epoch 1's graphs."""
    teacher = teacher_run / "last.safetensors" if "job=distill" in overrides else None
    trainer = build_trainer(tmp_path, [*COMPILED, "data.crop_padding=2", "data.hflip=true", *overrides], teacher=teacher)
    first = trainer.train_epoch(1)
    compiled = graphs_compiled()
    second = trainer.train_epoch(2)
    assert graphs_compiled() == compiled, "epoch 2 compiled new graphs"
    assert math.isfinite(first["loss"]["total"]) and math.isfinite(second["loss"]["total"])
    assert second["loss"]["total"] < first["loss"]["total"] * 1.5  # it trains rather than diverging


def cache_counts(record: dict) -> dict[str, int]:
    """The cache's hit and compute counts in an epoch record (beside them it reports its table size)."""
    return {key: record["teacher_cache"][key] for key in ("hits", "computed")}


def test_teacher_cache_on_the_device_under_compile(teacher_run: Path, tmp_path: Path) -> None:
    """Per-epoch tables on the GPU; the lookup runs eagerly, so a new epoch's table compiles nothing new."""
    teacher = teacher_copy(teacher_run, tmp_path)
    overrides = [*COMPILED, "job=distill", "method.name=kd", "train.cache_teacher=true", "data.crop_padding=2", "data.hflip=true"]
    trainer = build_trainer(tmp_path, overrides, teacher=teacher)
    first = trainer.train_epoch(1)
    compiled = graphs_compiled()
    second = trainer.train_epoch(2)
    assert graphs_compiled() == compiled, "a new epoch's table recompiled the step"
    assert cache_counts(first) == cache_counts(second) == {"hits": 0, "computed": TRAIN_SAMPLES}
    assert all(column.device.type == "cuda" for column in trainer.method.teacher._columns.values())
    again = build_trainer(tmp_path / "again", overrides, teacher=teacher).train_epoch(1)
    assert cache_counts(again) == {"hits": TRAIN_SAMPLES, "computed": 0}
    assert again["loss"]["total"] == pytest.approx(first["loss"]["total"], rel=1e-2)


# -- non-finite losses under fp16 -----------------------------------------------------------


def test_nonfinite_loss_under_fp16_stops_or_is_skipped(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli_plugins.kd import HintonKD

    args = [*KD_RUN, "--teacher", teacher_run / "last.safetensors", "--set", "train.precision=fp16"]
    with monkeypatch.context() as patch:
        poison_loss(patch, HintonKD, "kd", {STEPS_PER_EPOCH + 3})
        stopped = run_cli(*args, "--out", tmp_path / "stop")
    assert stopped.exit_code == 1, stopped
    assert "loss term kd went non-finite (NaN or inf) in epoch 2 at step 3/9" in stopped.stderr
    with monkeypatch.context() as patch:
        poison_loss(patch, HintonKD, "kd", {2, STEPS_PER_EPOCH + 4})
        skipped = run_cli(*args, "--out", tmp_path / "skip", "--set", "train.nonfinite_loss=skip", "--json")
    assert skipped.exit_code == 0, skipped
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [record["skipped_steps"] for record in records] == [1, 1]
    weights, _ = load_checkpoint(tmp_path / "skip" / "last.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())


# -- nccl -------------------------------------------------------------------------------------


def test_one_process_torchrun(teacher_run: Path, tmp_path: Path) -> None:
    """torchrun's environment (LOCAL_RANK, WORLD_SIZE=1) picks the GPU and trains."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "kdcli"]
    args = ["distill", "--epochs", "1", *CUDA, "--teacher", str(teacher_run / "last.safetensors"), *TINY, "--out", str(tmp_path / "run"), "--json"]
    completed = subprocess.run([*launcher, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout)["epochs"] == 1


@dataclass(frozen=True)
class GroupOfOne(Runtime):
    """A process group of one that takes the distributed paths: DDP with device_ids, nccl collectives."""

    @property
    def distributed(self) -> bool:
        return True


def test_ddp_and_nccl_collectives_in_a_group_of_one(teacher_run: Path, tmp_path: Path) -> None:
    """One GPU cannot hold two nccl ranks; a group of one still runs every collective the engine and cache issue."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        runtime = GroupOfOne(device=torch.device("cuda", 0), autocast_dtype=torch.bfloat16)
        overrides = ["job=distill", "method.name=kd", "train.cache_teacher=true", "train.epochs=1"]
        trainer = build_trainer(tmp_path, overrides, teacher=teacher_copy(teacher_run, tmp_path), runtime=runtime)
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        history = trainer.fit()
    finally:
        dist.destroy_process_group()
    assert cache_counts(history[-1]) == {"hits": 0, "computed": TRAIN_SAMPLES}
    assert 0.0 <= history[-1]["val_top1"] <= 1.0 and math.isfinite(history[-1]["loss"]["total"])
