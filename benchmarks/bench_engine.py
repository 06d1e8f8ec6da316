"""Engine overhead and peak memory: kdcli's KD step against a hand-written PyTorch loop.

Both sides train the same student from the same teacher on the same in-memory,
CIFAR-shaped data with the same batch augmentation and SGD settings; the only
difference is kdcli's engine (method object, loss dict, metric accumulation,
progress bookkeeping) around the step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import report, scaled
from benchmarks.harness import Workload, trainer_throughput
from kdcli.data.augment import BatchAugment
from kdcli.jobs.common import load_data
from kdcli.models import create_model
from kdcli.registry import load_model_plugins

WORKLOAD = scaled(Workload(), Workload(batch_size=8, steps=2))
REPEATS = scaled(2, 1)


def bare_loop_throughput(workload: Workload) -> float:
    """The minimal loop a researcher would write: gather, augment, forward, KD loss, step."""
    config = workload.config("kd", "distill")
    load_model_plugins()
    bundle = load_data(config.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    teacher = create_model(workload.teacher, num_classes=bundle.num_classes, input_size=bundle.input_size).to(device).eval()
    student = create_model(workload.student, num_classes=bundle.num_classes, input_size=bundle.input_size).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    augment = BatchAugment(bundle.mean, bundle.std, crop_padding=4, hflip=True)
    images, targets = bundle.train.images.to(device), bundle.train.targets.to(device)
    generator = torch.Generator(device).manual_seed(0)

    def epoch() -> tuple[int, float]:
        started = time.perf_counter()
        order = torch.randperm(len(targets), device=device)
        seen = 0
        for index in order.split(workload.batch_size)[: workload.steps]:
            inputs = augment(images[index], generator)
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            logits = student(inputs)
            kd = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(teacher_logits / 4, 1), reduction="batchmean") * 16
            loss = 0.1 * F.cross_entropy(logits, targets[index]) + 0.9 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - started

    epoch()  # warm-up
    seen, elapsed = epoch()
    return seen / elapsed


def peak_memory(side: str) -> dict[str, float]:
    """Run one side in a fresh process and return its peak memory (RSS; CUDA allocator if any)."""
    code = (
        "import json, resource, torch\n"
        "from benchmarks.bench_engine import WORKLOAD, bare_loop_throughput\n"
        "from benchmarks.harness import trainer_throughput\n"
        f"side = {side!r}\n"
        "bare_loop_throughput(WORKLOAD) if side == 'bare' else trainer_throughput(WORKLOAD.config('kd', 'distill'), WORKLOAD)\n"
        "cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0\n"
        "print(json.dumps({'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'cuda_mib': cuda}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    config = WORKLOAD.config("kd", "distill")
    # Interleave the two sides so drifting machine load affects both alike.
    bare, engine = [], []
    for _ in range(REPEATS):
        bare.append(bare_loop_throughput(WORKLOAD))
        engine.append(trainer_throughput(config, WORKLOAD))
    report(
        f"engine overhead ({WORKLOAD.teacher}->{WORKLOAD.student} KD, batch {WORKLOAD.batch_size}, 32x32, best of {REPEATS})",
        "bare loop", max(bare), "kdcli", max(engine), unit="samples/s", target=">= 0.97x",
    )
    bare_memory, engine_memory = peak_memory("bare"), peak_memory("kdcli")
    key = "cuda_mib" if torch.cuda.is_available() else "rss_mib"
    report("peak memory (distill vs bare loop)", "bare loop", bare_memory[key], "kdcli", engine_memory[key], unit="MiB")


if __name__ == "__main__":
    main()
