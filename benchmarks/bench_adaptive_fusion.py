"""adaptive-fusion (TGeo-KD) training-step cost against a ``kd`` step on the same models and batch.

A step is what the engine does per batch: the method's ``training_step``, backward
and the student's SGD step; adaptive-fusion's step adds, every ``meta_every`` steps,
the fusion network's bilevel update (virtual step + validation batch + hypergradient).
Teacher cifar_resnet20, student cifar_resnet8, batch 64 of 3x32x32, 100 classes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.common import report, scaled
from kdcli.method import Batch, FrozenTeacher, Method, MethodContext
from kdcli.models import create_model
from kdcli.registry import get_method, load_model_plugins

BATCH, CLASSES, INPUT = scaled(64, 8), scaled(100, 10), (3, 32, 32)
ROUNDS = scaled(9, 1)


def _batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH, *INPUT, generator=generator)
    return Batch(inputs, torch.randint(CLASSES, (BATCH,), generator=generator), torch.arange(BATCH))


def _context() -> MethodContext:
    val = _batch(1)

    def batches(split: str, **options: Any) -> Iterator[Batch]:
        yield val

    return MethodContext(
        num_classes=CLASSES, num_train=BATCH, epochs=1, steps_per_epoch=1, device=torch.device("cpu"),
        mean=(0.0,) * 3, std=(1.0,) * 3, batches=batches, has_val=True,
    )


def _training_steps(name: str, params: dict[str, Any], steps_per_call: int) -> Callable[[], None]:
    """``steps_per_call`` engine steps of method ``name`` on fresh copies of the same models."""
    torch.manual_seed(0)
    student = create_model("cifar_resnet8", num_classes=CLASSES, input_size=INPUT).train()
    teacher = create_model("cifar_resnet20", num_classes=CLASSES, input_size=INPUT).eval().requires_grad_(False)
    method_cls = get_method(name)
    method: Method = method_cls(method_cls.Params.model_validate(params), student=student, teacher=FrozenTeacher(teacher), context=_context())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    batch = _batch(0)
    method.on_epoch_start(1)

    def steps() -> None:
        for _ in range(steps_per_call):
            loss = sum(method.training_step(batch).losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return steps


def _paired_seconds(baseline: Callable[[], None], candidate: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of each, timed in alternation so that machine load hits both alike."""
    timings: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds + 1):
        for function, times in zip((baseline, candidate), timings):
            started = time.perf_counter()
            function()
            if round_:  # the first round is warm-up
                times.append(time.perf_counter() - started)
    return statistics.median(timings[0]), statistics.median(timings[1])


def main() -> None:
    load_model_plugins()
    steps = 5  # a call of meta_every=5 is five steps: one with the bilevel update, four without
    variants = {
        "meta_every=1": ({"meta_every": 1}, "<= 3x"),
        "meta_every=5": ({"meta_every": 5}, "<= 1.5x"),
        "meta_every=1 first_order": ({"meta_every": 1, "first_order": True}, ""),
    }
    for label, (params, target) in variants.items():
        kd, fusion = _paired_seconds(_training_steps("kd", {}, steps), _training_steps("adaptive-fusion", params, steps), rounds=ROUNDS)
        report(f"adaptive-fusion step, {label}", "kd", kd / steps, "adaptive-fusion", fusion / steps, target=target)
