"""torch.compile's graphs of the training step, counted on the CPU with a backend that only records them.

Which graphs dynamo makes and which one each step runs do not depend on the
device, so this is checked here, in seconds; tests/test_cuda.py compiles for real.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY, run_cli


class GraphRecorder:
    """A torch.compile backend that runs each graph as traced and counts, per graph, the steps it ran."""

    def __init__(self) -> None:
        self.batch_sizes: list[int | None] = []
        self.calls: list[int] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        number = len(self.calls)
        self.calls.append(0)
        labels = [tensor for tensor in example_inputs if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64 and tensor.dim() == 1]
        self.batch_sizes.append(len(labels[0]) if labels else None)  # the batch's targets (parameters are inputs too)

        def run(*args: Any) -> Any:
            self.calls[number] += 1
            return graph.forward(*args)

        return run


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> GraphRecorder:
    torch._dynamo.reset()
    recorder = GraphRecorder()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recorder))
    yield recorder
    torch._dynamo.reset()


def test_last_smaller_batch_gets_its_own_graph(recorder: GraphRecorder, tmp_path: Path) -> None:
    """432 samples in batches of 40: 10 full batches and one of 32 per epoch, over 2 epochs.

    Shape-generic recompilation for the 32 would leave the full batches of epoch 2 on
    the generic graph (dynamo tries the graph used last first).
    """
    args = ["--model", "cifar_resnet8", "--epochs", 2, "--batch-size", 40, "--set", "train.compile=true",
            "--set", "data.synthetic.num_train=480", "--set", "data.synthetic.num_test=240", "-q"]
    result = run_cli("teach", "--out", tmp_path / "run", *args)
    assert result.exit_code == 0, result
    assert recorder.batch_sizes == [40, 32]
    assert recorder.calls == [20, 2]


def test_teacher_cache_tables_compile_nothing_new(recorder: GraphRecorder, teacher_run: Path, tmp_path: Path) -> None:
    """With random augmentation every epoch has its own table of teacher logits; the lookup runs eagerly."""
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "last.safetensors", teacher)
    args = ["--teacher", teacher, "--cache-teacher", "--epochs", 3, "--set", "train.compile=true",
            "--set", "data.crop_padding=2", "--set", "data.hflip=true", *TINY]
    result = run_cli("distill", "--out", tmp_path / "run", *args)
    assert result.exit_code == 0, result
    assert recorder.calls == [27]  # 9 steps a epoch, one graph

