"""torch.compile's graphs of the student's forward (and the teacher's), counted on the CPU with a backend that only records them.

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
        # The forward's ``inputs`` argument (parameters are graph inputs too): the batch.
        names = [node.name for node in graph.graph.nodes if node.op == "placeholder"]
        batch = [value for name, value in zip(names, example_inputs) if name.startswith("l_inputs")]
        self.batch_sizes.append(len(batch[0]) if batch else None)

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



# -- every built-in method: only the student's forward (and the teacher's, apart) is compiled --------------

# 200 training samples in batches of 48: four full batches and a last one of 8 per epoch.
SMALL_LAST_BATCH = ["--model", "cifar_resnet8", "--epochs", 3, "--batch-size", 48, "-q", "--set", "train.compile=true",
                    "--set", "data.synthetic.num_train=200", "--set", "data.synthetic.num_test=48"]
METHOD_RUNS = {
    "standard": ("teach", []),
    "soteacher": ("teach", []),
    "kd": ("distill", ["--teacher"]),
    "tfkd-self": ("distill", ["--teacher"]),
    "tfkd-virtual": ("distill", []),
    "feature-mimic": ("distill", ["--teacher"]),
    "adaptive-fusion": ("distill", ["--teacher", "--set", "data.val_split=0.2"]),
    "dkd": ("distill", ["--teacher"]),
    "dist": ("distill", ["--teacher"]),
    "at": ("distill", ["--teacher"]),
    "sp": ("distill", ["--teacher"]),
    "pkt": ("distill", ["--teacher"]),
    "rkd": ("distill", ["--teacher"]),
}


def test_every_built_in_method_is_covered() -> None:
    listed = {row["name"] for row in run_cli("methods", "list", "--json").json() if row["distribution"] == "kdcli"}
    assert listed == set(METHOD_RUNS)


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_no_recompile_after_the_first_epoch_and_no_graph_break(
    method: str, teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch numbers, schedules and banks stay out of the compiled region: epochs 2 and 3 reuse epoch 1's graphs.

    Dynamo's own ``eager`` backend: recompiles and graph breaks are dynamo's, whatever generates the code.
    """
    from torch._dynamo.utils import counters

    from kdcli.engine import Trainer

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    graphs_after_epoch: list[int] = []
    original = Trainer.train_epoch

    def counted_epoch(self: Trainer, epoch: int) -> dict[str, Any]:
        record = original(self, epoch)
        graphs_after_epoch.append(counters["stats"]["unique_graphs"])
        return record

    monkeypatch.setattr(Trainer, "train_epoch", counted_epoch)
    job, options = METHOD_RUNS[method]
    options = [item for option in options for item in ([option, teacher_run / "last.safetensors"] if option == "--teacher" else [option])]
    try:
        result = run_cli(job, "--method", method, "--out", tmp_path / "run", *SMALL_LAST_BATCH, *options)
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 0, result
    assert len(graphs_after_epoch) == 3
    assert graphs_after_epoch[0] == graphs_after_epoch[-1], f"epochs 2-3 compiled {graphs_after_epoch[-1] - graphs_after_epoch[0]} new graphs"
    # The student's forward at two batch sizes (48 and the last 8), the teacher's likewise when there is one.
    assert graphs_after_epoch[0] == (4 if "--teacher" in options else 2)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_compile_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        raise RuntimeError("no code generator for this machine\nsecond line of a long report")

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    try:
        result = run_cli("teach", "--out", tmp_path / "run", *SMALL_LAST_BATCH)
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: torch.compile failed"), result
    assert "train.compile=false" in lines[0] and "Traceback" not in result.stderr

