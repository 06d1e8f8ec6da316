"""The training features recipes use: parameter groups, --ema, --accumulate, --sync-bn."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import kdcli
from conftest import TINY, interrupted_and_resumed, run_cli
from kdcli.checkpoint import load_checkpoint, load_state
from kdcli.config import OptimConfig, TrainConfig
from kdcli.errors import UsageError
from kdcli.models import create_model
from kdcli.registry import load_model_plugins
from kdcli.optim import parameter_groups
from kdcli.runtime import Runtime
from kdcli.sync_bn import with_sync_batch_norm

SMALL = ["--model", "cifar_resnet8", "--set", "train.deterministic=true", *TINY]


def resnet8() -> nn.Module:
    load_model_plugins()  # registers the cifar_* zoo with timm
    return create_model("cifar_resnet8", num_classes=10, input_size=(3, 32, 32))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- parameter groups -------------------------------------------------------------------


def test_norm_and_bias_parameters_get_no_weight_decay() -> None:
    model = resnet8()
    groups = parameter_groups(model, model, OptimConfig(weight_decay=5e-4))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    by_decay = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in groups}
    assert set(by_decay) == {0.0, 5e-4}
    assert by_decay[0.0] == {name for name, p in model.named_parameters() if p.ndim == 1}  # bn weights and biases, fc.bias
    assert "fc.bias" in by_decay[0.0] and "fc.weight" in by_decay[5e-4] and "conv1.weight" in by_decay[5e-4]
    single = parameter_groups(model, model, OptimConfig(weight_decay=5e-4, no_decay_norm_bias=False))
    assert len(single) == 1 and len(single[0]["params"]) == len(list(model.parameters()))  # 0.2's one group


def test_layer_decay_scales_the_lr_from_the_head_down() -> None:
    model = resnet8()
    groups = parameter_groups(model, model, OptimConfig(lr=0.1, layer_decay=0.5))
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert lr_of[id(model.fc.weight)] == 0.1  # the head keeps the peak lr
    assert lr_of[id(model.conv1.weight)] < lr_of[id(model.layer3[0].conv1.weight)] < 0.1
    assert {round(math.log(lr / 0.1, 0.5), 6) for lr in lr_of.values()} == set(map(float, range(len(set(lr_of.values())))))
    assert {group["weight_decay"] for group in groups} == {0.0, 5e-4}
    decayed = parameter_groups(model, model, OptimConfig(lr=0.1, layer_decay=0.5, no_decay_norm_bias=False))
    assert {group["weight_decay"] for group in decayed} == {5e-4}


def test_layer_decay_refused_where_timm_cannot_group_the_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UsageError, match="cannot group the layers"):
        parameter_groups(model, model, OptimConfig(layer_decay=0.75))


def test_the_schedule_drives_every_group(tmp_path: Path) -> None:
    out = tmp_path / "run"
    schedule = ["--set", "schedule.name=multistep", "--set", "schedule.milestones=[1]", "--set", "schedule.gamma=0.3"]
    result = run_cli("teach", *SMALL, "--epochs", 2, *schedule, "--set", "optim.layer_decay=0.6", "--out", out)
    assert result.exit_code == 0, result
    groups = load_state(out / "resume.safetensors")["optimizer"]["param_groups"]
    assert len({group["initial_lr"] for group in groups}) >= 3  # the layers' own peak rates
    for group in groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.3)
    assert records(out)[1]["lr"] == pytest.approx(0.05 * 0.3)  # the record shows the head's (peak) lr


# -- EMA --------------------------------------------------------------------------------


def test_ema_update_equals_timms_model_ema_v3() -> None:
    """StudentEma pairs its tensors once instead of walking two state dicts a step: the same numbers, bit for bit."""
    from timm.utils import ModelEmaV3

    from kdcli.ema import StudentEma

    student = resnet8()
    ours, timms = StudentEma(student, 0.9), ModelEmaV3(student, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for tensor in student.state_dict().values():
                tensor.add_(torch.randn_like(tensor) if tensor.is_floating_point() else torch.ones_like(tensor))
        ours.update(student)
        timms.update(student)
    for (name, value), expected in zip(ours.state_dict().items(), timms.module.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name


def test_ema_is_evaluated_saved_and_a_normal_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli("teach", *SMALL, "--epochs", 2, "--ema", "0.9", "--out", out).exit_code == 0
    last_record = records(out)[-1]
    assert 0.0 <= last_record["ema_val_top1"] <= 1.0 and last_record["ema_val_nll"] > 0
    ema, info = load_checkpoint(out / "ema.safetensors")
    raw, _ = load_checkpoint(out / "last.safetensors")
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[key], raw[key]) for key in ema)
    assert info.epoch == 2 and info.metrics == {"val_top1": last_record["ema_val_top1"], "val_nll": last_record["ema_val_nll"]}
    # kdcli eval on the same validation split reproduces the EMA's number from training.
    evaluated = run_cli("eval", out / "ema.safetensors", "--split", "val", "--json")
    assert evaluated.exit_code == 0, evaluated
    assert evaluated.json()["metrics"]["top1"] == pytest.approx(last_record["ema_val_top1"])
    exported = run_cli("export", out / "ema.safetensors", tmp_path / "hub")
    assert exported.exit_code == 0, exported
    weights = safetensors.torch.load_file(tmp_path / "hub" / "model.safetensors")
    assert all(torch.equal(weights[key], ema[key]) for key in ema)


def test_ema_and_accumulation_resume_bit_exact_inside_an_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 18 micro-batches of 24 an epoch, 9 optimizer steps; Ctrl-C during micro-step 5 of epoch 2 stops
    # before micro-step 6, the next group's first: accumulated gradients are never part of a state.
    args = [*SMALL, "--epochs", 2, "--ema", "0.9", "--accumulate", "2"]
    straight, resumed = interrupted_and_resumed(args, tmp_path, monkeypatch, interrupt_at=18 + 5, label="step 6/18 of epoch 2")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    ema_straight, ema_resumed = (safetensors.torch.load_file(tmp_path / run / "ema.safetensors") for run in ("straight", "resumed"))
    for key in ema_straight:
        assert torch.equal(ema_straight[key], ema_resumed[key]), key
    strip = lambda record: {k: v for k, v in record.items() if k not in ("time_s", "samples_per_s")}  # noqa: E731
    assert [strip(r) for r in records(tmp_path / "straight")] == [strip(r) for r in records(tmp_path / "resumed")]


# -- gradient accumulation --------------------------------------------------------------

# test_vit normalizes per sample (LayerNorm): micro-batches change nothing but summation order.
# 450 training samples: 9 steps of 48 and a last one of 18, which 4 micro-batches of 12 cover as a
# short group of 2 (12 + 6 samples), weighed as one batch of 18.
VIT = [
    "teach", "--model", "test_vit", "--epochs", "2", "--lr", "0.01", "--set", "train.deterministic=true",
    "--set", "data.synthetic.num_train=500", "--set", "data.synthetic.num_test=64", "--batch-size", "48", "-q",
]


def test_micro_batches_give_the_update_of_one_batch(tmp_path: Path) -> None:
    assert run_cli(*VIT, "--out", tmp_path / "one").exit_code == 0
    assert run_cli(*VIT, "--accumulate", "4", "--out", tmp_path / "micro").exit_code == 0
    one, micro = (load_state(tmp_path / run / "resume.safetensors") for run in ("one", "micro"))
    assert one["scheduler"]["last_epoch"] == micro["scheduler"]["last_epoch"] == 20  # the schedule counts optimizer steps
    for key, value in one["model"].items():
        torch.testing.assert_close(micro["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "micro"), strict=True):
        assert a["lr"] == b["lr"] and a["loss"]["total"] == pytest.approx(b["loss"]["total"], rel=1e-4)


# -- SyncBatchNorm ----------------------------------------------------------------------


def test_sync_bn_converts_every_batch_norm_and_keeps_the_checkpoint_keys() -> None:
    model = resnet8()
    keys, parameters = list(model.state_dict()), [id(p) for p in model.parameters()]
    cuda = Runtime(device=torch.device("cuda"), autocast_dtype=None, rank=0, world_size=2)  # conversion touches no device
    converted = with_sync_batch_norm(model, TrainConfig(sync_bn=True), cuda)
    norms = [module for module in converted.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(module, nn.SyncBatchNorm) for module in norms)
    assert list(converted.state_dict()) == keys and [id(p) for p in converted.parameters()] == parameters
    cpu = Runtime(device=torch.device("cpu"), autocast_dtype=None, rank=0, world_size=2)
    with pytest.raises(UsageError, match="needs CUDA devices"):
        with_sync_batch_norm(resnet8(), TrainConfig(sync_bn=True), cpu)


def test_sync_bn_under_torchrun_on_cpu_is_one_line_per_process(tmp_path: Path) -> None:
    """torch's SyncBatchNorm cannot train on CPU tensors (gloo): refused before the run directory exists."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, "-m", "kdcli", "teach", *SMALL, "--epochs", "1", "--sync-bn", "--out", str(tmp_path / "run")]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("kdcli: error:")]
    assert len(errors) == 2 and all("--sync-bn (train.sync_bn) needs CUDA devices" in line for line in errors), completed.stderr[-3000:]
    # torchrun reports its failed workers with a traceback of its own; no frame of kdcli's may appear.
    assert str(Path(kdcli.__file__).parent) not in completed.stderr and not (tmp_path / "run").exists()


def test_a_run_saved_before_parameter_groups_resumes_with_one_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kdcli 0.2 decayed every parameter and its config.json lacks optim.no_decay_norm_bias: it resumes as it started."""
    from kdcli.engine import Trainer

    out, original = tmp_path / "run", Trainer.train_epoch

    def stop_in_epoch_2(self: Trainer, epoch: int) -> dict:
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", stop_in_epoch_2)
        assert run_cli("teach", *SMALL, "--epochs", 2, "--set", "optim.no_decay_norm_bias=false", "--out", out).exit_code == 130
    config = json.loads((out / "config.json").read_text())
    del config["optim"]["no_decay_norm_bias"]
    (out / "config.json").write_text(json.dumps(config))
    resumed = run_cli("teach", "--resume", out, "-q")
    assert resumed.exit_code == 0, resumed
    assert len(load_state(out / "resume.safetensors")["optimizer"]["param_groups"]) == 1


def test_all_but_a_groups_last_micro_step_skip_the_all_reduce(tmp_path: Path) -> None:
    """``Updater.syncing`` finds DDP (under ``torch.compile``'s wrapper too) and turns its gradient sync off inside a group."""
    import torch.distributed as dist

    from kdcli.update import Updater

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        update = Updater(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), OptimConfig(), every=3, micro_batch=4, micro_steps=7)
        syncs = []
        for wrapped in (ddp, torch.compile(ddp)):
            update.begin_epoch(0)
            for _ in range(7):  # groups of 3, 3 and a short one of 1
                with update.syncing(wrapped):
                    syncs.append(ddp.require_backward_grad_sync)
                update.step += 1
        assert syncs == [False, False, True, False, False, True, True] * 2
    finally:
        dist.destroy_process_group()


def test_accumulation_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    """2 gloo processes, each with 2 micro-batches of 6 a step (no_sync on the first), reach the weights of 1 process
    taking whole batches of 24."""
    args = [*VIT[:-1], "--epochs", "1", "--set", "data.synthetic.num_train=240", "--batch-size", "24", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, out in (([*launcher, "-m", "kdcli", *args, "--accumulate", "2"], "two"), ([sys.executable, "-m", "kdcli", *args], "one")):
        completed = subprocess.run([*command, "--out", str(tmp_path / out)], capture_output=True, text=True, env=env, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
    one, two = (safetensors.torch.load_file(tmp_path / run / "last.safetensors") for run in ("one", "two"))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_nonfinite_micro_step_drops_its_whole_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With train.nonfinite_loss=skip, a NaN in one micro-batch drops the update of its group: the finite micro-batch
    beside it changes nothing, so poisoning one or both micro-batches of a group ends in the same weights."""
    from kdcli_plugins.standard import Standard
    from test_fault_injection import poison_loss

    args = ["teach", *SMALL, "--epochs", 1, "--accumulate", "2", "--set", "train.nonfinite_loss=skip", "--json"]
    for name, poisoned in (("one", {3}), ("both", {3, 4})):  # micro-steps 3 and 4: the second group
        with monkeypatch.context() as patch:
            poison_loss(patch, Standard, "ce", poisoned)
            result = run_cli(*args, "--out", tmp_path / name)
        assert result.exit_code == 0, result
        assert result.json()["skipped_steps"] == len(poisoned)  # micro-steps with a non-finite loss
    one, both = (load_state(tmp_path / run / "resume.safetensors") for run in ("one", "both"))
    assert one["scheduler"]["last_epoch"] == both["scheduler"]["last_epoch"] == 9  # every group counted, the dropped one too
    for key, value in one["model"].items():
        assert torch.equal(value, both["model"][key]), key
