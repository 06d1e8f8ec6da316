"""The top-k teacher cache at 1000 classes: KD-loss error against full logits, and bytes per sample.

No pretrained 1000-class teacher is reachable offline, so the teacher logits
are drawn to look like an ImageNet teacher's: a confident class (margin 4-12),
five semantic neighbours (margin 2-6) and Gaussian background; the student's
logits are the teacher's, shrunk and perturbed.  The KD term is Hinton's
tau^2 * KL(teacher || student) at tau 1 and 4 (batch mean), computed from the
full logits and from the logits ``TopKLogits`` decodes.  Two errors: of the loss
value (which includes the teacher's entropy, a constant for training) and of
its gradient with respect to the student's logits (what training follows),
both relative.
"""

from __future__ import annotations

import torch

from benchmarks.common import scaled

from kdcli.losses import distillation_kl
from kdcli.teacher_cache import FullLogits, TopKLogits, table_bytes

CLASSES, SAMPLES = 1000, scaled(4096, 32)


def imagenet_like_logits(generator: torch.Generator) -> torch.Tensor:
    logits = torch.randn(SAMPLES, CLASSES, generator=generator)
    rows = torch.arange(SAMPLES).unsqueeze(1)
    top = torch.randint(CLASSES, (SAMPLES, 1), generator=generator)
    neighbours = torch.randint(CLASSES, (SAMPLES, 5), generator=generator)
    logits[rows, neighbours] += 2 + 4 * torch.rand(SAMPLES, 5, generator=generator)
    logits[rows, top] += 4 + 8 * torch.rand(SAMPLES, 1, generator=generator)
    return logits


def kd_and_gradient(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = student.clone().requires_grad_()
    loss = distillation_kl(logits, teacher, temperature)
    (gradient,) = torch.autograd.grad(loss, logits)
    return loss.detach(), gradient


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = imagenet_like_logits(generator)
    student = 0.7 * teacher + torch.randn(SAMPLES, CLASSES, generator=generator)
    full_bytes = table_bytes(FullLogits().encode(teacher)) / SAMPLES
    print(f"top-k teacher cache, {CLASSES} classes, {SAMPLES} samples: full logits {full_bytes:.0f} bytes/sample", flush=True)
    for k in (5, 10, 20):
        codec = TopKLogits(k)
        columns = codec.encode(teacher)
        decoded = codec.decode(columns, CLASSES)
        errors = []
        for temperature in (1.0, 4.0):
            (exact, exact_grad), (approximate, approximate_grad) = (kd_and_gradient(student, target, temperature) for target in (teacher, decoded))
            gradient_error = ((approximate_grad - exact_grad).norm() / exact_grad.norm()).item()
            errors.append(f"tau {temperature:g}: loss error {abs(approximate / exact - 1).item():.1%}, gradient error {gradient_error:.1%}")
        per_sample = table_bytes(columns) / SAMPLES
        print(f"  k={k:>2}: {per_sample:.0f} bytes/sample ({full_bytes / per_sample:.0f}x smaller); " + "; ".join(errors), flush=True)


if __name__ == "__main__":
    main()
