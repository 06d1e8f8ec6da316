"""The runtime's process-wide settings end with it: one run's determinism does not leak into the next."""

from __future__ import annotations

import pytest
import torch

from kdcli.config import TrainConfig
from kdcli.runtime import runtime_for


def test_deterministic_run_restores_the_process_settings() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with runtime_for(TrainConfig(device="cpu", deterministic=True)):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_settings_are_restored_when_the_work_fails() -> None:
    with pytest.raises(RuntimeError), runtime_for(TrainConfig(device="cpu", deterministic=True)):
        raise RuntimeError("the work inside failed")
    assert not torch.are_deterministic_algorithms_enabled()
