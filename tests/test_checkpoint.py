"""State files and checkpoints: no pickle, exact round trips, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdcli.checkpoint import (
    CheckpointInfo,
    WriteFailed,
    atomic_write_bytes,
    load_checkpoint,
    load_state,
    save_checkpoint,
    save_state,
)
from kdcli.errors import KdcliError


def optimizer_after_steps(kind: type[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    model = torch.nn.Linear(3, 2)
    optimizer = kind(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.AdamW])
def test_state_round_trip_keeps_types_and_values(tmp_path: Path, kind: type[torch.optim.Optimizer]) -> None:
    if kind is torch.optim.SGD:
        optimizer = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
        optimizer.param_groups[0]["params"][0].grad = torch.ones(2, 3)
        optimizer.param_groups[0]["params"][1].grad = torch.ones(2)
        optimizer.step()
    else:
        optimizer = optimizer_after_steps(kind)
    tree = {"optimizer": optimizer.state_dict(), "epoch": 7, "history": [{"loss": {"ce": 0.5}}], "bank": torch.arange(6.0).view(2, 3), "none": None}
    save_state(tmp_path / "state.safetensors", tree)
    loaded = load_state(tmp_path / "state.safetensors")
    assert loaded["epoch"] == 7 and loaded["history"] == tree["history"] and loaded["none"] is None
    assert torch.equal(loaded["bank"], tree["bank"])
    assert set(loaded["optimizer"]["state"]) == {0, 1}  # int keys survive
    for key, value in tree["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][key], value)
    fresh = type(optimizer)(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.1


def test_checkpoint_round_trip_with_tied_weights(tmp_path: Path) -> None:
    shared = torch.randn(4, 4)
    weights = {"encoder.weight": shared, "decoder.weight": shared}  # safetensors refuses shared storage as is
    info = CheckpointInfo(arch="x", num_classes=4, input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.2,) * 3, method="standard", epoch=2)
    save_checkpoint(tmp_path / "c.safetensors", weights, info)
    loaded, loaded_info = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded_info == info and torch.equal(loaded["decoder.weight"], shared)


def test_state_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    save_state(tmp_path / "s.safetensors", {"epoch": 1})
    with pytest.raises(KdcliError, match="not a kdcli checkpoint"):
        load_checkpoint(tmp_path / "s.safetensors")


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.safetensors"
    atomic_write_bytes(target, b"good")

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match="No space left on device.*previous last.safetensors is unchanged"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"good"
    assert [path.name for path in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind
