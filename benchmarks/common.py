"""Shared timing and reporting for the benchmarks."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
# Set by ``python -m benchmarks --smoke`` before any benchmark is imported: module constants read it.
SMOKE_ENV = "KDCLI_BENCH_SMOKE"


def smoke() -> bool:
    """Whether this is a smoke run: every benchmark at a tiny size, to prove it runs end to end (numbers mean nothing)."""
    return os.environ.get(SMOKE_ENV) == "1"


def scaled(full: T, tiny: T) -> T:
    """``full`` in a real benchmark run, ``tiny`` in a smoke run."""
    return tiny if smoke() else full


def machine() -> str:
    """One line naming the hardware the numbers were measured on."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
    return f"{device}; torch {torch.__version__}; {torch.get_num_threads()} threads; {os.cpu_count()} cpus"


def seconds_per_call(function: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``function`` after ``warmup`` calls (synchronizing CUDA)."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    timings.sort()
    return timings[len(timings) // 2]


def report(name: str, baseline_label: str, baseline: float, candidate_label: str, candidate: float, unit: str = "s/step", target: str = "") -> None:
    """``name: baseline X unit, candidate Y unit, ratio Y/X [target]`` on one line."""
    ratio = candidate / baseline
    suffix = f"  (target {target})" if target else ""
    print(f"{name}: {baseline_label} {baseline:.4g} {unit}, {candidate_label} {candidate:.4g} {unit}, ratio {ratio:.3f}x{suffix}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def gpu_utilization(device: torch.device, every_s: float = 0.05) -> Iterator[list[float]]:
    """NVML's GPU utilization (percent) sampled while the block runs; empty on a CPU or without NVML bindings."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            samples.append(float(torch.cuda.utilization(device)))

    thread = None
    if device.type == "cuda":
        try:
            torch.cuda.utilization(device)  # raises without NVML bindings (pynvml / nvidia-ml-py)
        except Exception:  # noqa: BLE001 - whatever NVML raises, utilization is simply not reported
            pass
        else:
            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
    try:
        yield samples
    finally:
        done.set()
        if thread is not None:
            thread.join()


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (closing notes and docs paste it); None cells print as "-"."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
