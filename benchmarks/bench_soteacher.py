"""SoTeacher's training-step cost against standard training: same model, batch and optimizer.

The extra work per step is the Lipschitz bound over every conv/bn/linear layer
(forward and backward) and the bank read and update; the target is <= 1.15x.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from benchmarks.common import report, scaled, seconds_per_call
from kdcli.method import Batch, Method, MethodContext
from kdcli.models import create_model
from kdcli.registry import load_model_plugins
from kdcli_plugins.soteacher import SoTeacher, SoTeacherParams
from kdcli_plugins.standard import Standard, StandardParams

NUM_TRAIN = scaled(10_000, 256)
NUM_CLASSES = 10
BATCH_SIZE = 64
WARMUP = 3
REPEATS = scaled(30, 2)
MODELS = scaled(("cifar_resnet20", "cifar_wrn_40_2"), ("cifar_resnet8",))


def step_function(method: Method, batch: Batch) -> Callable[[], None]:
    """What the engine does per step: sum the loss terms, backward, optimizer step, the method's ``after_step``."""
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        output = method.training_step(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(output.losses.values()).backward()
        optimizer.step()
        method.after_step(batch, output)

    return step


def interleaved_medians(baseline: Callable[[], None], candidate: Callable[[], None]) -> tuple[float, float]:
    """Median seconds per call of each, timed alternately call by call so both see the same machine load."""
    timings: tuple[list[float], list[float]] = ([], [])
    for function in (baseline, candidate):
        seconds_per_call(function, warmup=WARMUP, repeats=1)
    for _ in range(REPEATS):
        for function, samples in zip((baseline, candidate), timings):
            samples.append(seconds_per_call(function, warmup=0, repeats=1))
    return statistics.median(timings[0]), statistics.median(timings[1])


def build(method_cls: type[Method], params: object, arch: str, image_size: int, device: torch.device) -> Method:
    torch.manual_seed(0)
    student = create_model(arch, num_classes=NUM_CLASSES, input_size=(3, image_size, image_size)).to(device).train()
    context = MethodContext(
        num_classes=NUM_CLASSES, num_train=NUM_TRAIN, epochs=10, steps_per_epoch=NUM_TRAIN // BATCH_SIZE,
        device=device, mean=(0.5,), std=(0.29,),
    )
    method = method_cls(params, student=student, teacher=None, context=context)
    method.on_epoch_start(2)  # past epoch 1, so the consistency term and its bank read are live
    return method


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_model_plugins()
    image_size = 32 if device.type == "cuda" else 16  # CIFAR's shape on a GPU, the synthetic set's on a CPU
    for arch in MODELS:
        generator = torch.Generator().manual_seed(0)
        batch = Batch(
            torch.randn(BATCH_SIZE, 3, image_size, image_size, generator=generator).to(device),
            torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator).to(device),
            torch.randperm(NUM_TRAIN, generator=generator)[:BATCH_SIZE].to(device),
        )
        standard = build(Standard, StandardParams(), arch, image_size, device)
        soteacher = build(SoTeacher, SoTeacherParams(), arch, image_size, device)
        baseline, candidate = interleaved_medians(step_function(standard, batch), step_function(soteacher, batch))
        report(
            f"soteacher step, {arch} {image_size}x{image_size} batch {BATCH_SIZE}",
            "standard", baseline, "soteacher", candidate, target="<= 1.15x",
        )
