"""Teacher-cache codecs at 1000 classes: KD loss and gradient error against exact logits, and bytes per sample-epoch.

No pretrained 1000-class teacher is reachable offline (and a timm model's
logits on random inputs are nothing like a trained teacher's on images), so the
teacher logits are sampled to look like a trained ImageNet teacher's: Gaussian
background (std 1-3 per sample), twenty semantic neighbours raised by a
geometrically fading 2-8, and a confident top class whose margin over the
runner-up is log-uniform in [0.5, 40] (median about 4.5: most samples are
confidently right, some are torn, some are certain).  The student's logits are
the teacher's, shrunk and perturbed.  The KD term is Hinton's
tau^2 * KL(teacher || student) at tau 1 and 4 (batch mean), computed from the
exact logits and from the logits each codec decodes (top-k tables are written
for the tau they are read at, as ``--cache-teacher`` does).  Two errors: of the
loss value (which includes the teacher's entropy, a constant for training) and
of its gradient with respect to the student's logits (what training follows),
both relative.

A second table checks that a top-k table keeps the tail's mass exact whatever
the margin, next to the old decoding (tail = 1 - sum of top-k probabilities in
fp32), which loses it for a confident teacher.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import scaled
from kdcli.losses import distillation_kl
from kdcli.teacher_cache import CODECS, LogitCodec, TopKLogits, table_bytes

CLASSES, SAMPLES = 1000, scaled(4096, 32)
NEIGHBOURS = 20
TEMPERATURES = (1.0, 4.0)
TOP_K = (5, 10, 20, 50)
MARGINS = (0.0, 10.0, 20.0, 30.0, 40.0)


def imagenet_like_logits(generator: torch.Generator, samples: int = SAMPLES, margin: float | None = None) -> torch.Tensor:
    """A trained 1000-class teacher's logits, sampled (see the module's docstring); ``margin``: the top class's, fixed."""
    spread = 1 + 2 * torch.rand(samples, 1, generator=generator)
    logits = spread * torch.randn(samples, CLASSES, generator=generator)
    rows = torch.arange(samples).unsqueeze(1)
    classes = torch.randperm(CLASSES, generator=generator)[: NEIGHBOURS + 1].expand(samples, -1)
    classes = classes.gather(1, torch.rand(samples, NEIGHBOURS + 1, generator=generator).argsort(dim=1))
    fading = 0.8 ** torch.arange(NEIGHBOURS, dtype=torch.float32)
    logits[rows, classes[:, 1:]] += (2 + 6 * torch.rand(samples, 1, generator=generator)) * fading
    if margin is None:
        margins = torch.exp(math.log(0.5) + math.log(80) * torch.rand(samples, generator=generator))
    else:
        margins = torch.full((samples,), margin)
    runner_up = logits.scatter(1, classes[:, :1], -math.inf).amax(dim=1)
    logits[rows.squeeze(1), classes[:, 0]] = runner_up + margins
    return logits


def kd_and_gradient(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = student.clone().requires_grad_()
    loss = distillation_kl(logits, teacher, temperature)
    (gradient,) = torch.autograd.grad(loss, logits)
    return loss.detach(), gradient


def codec_errors(codec_at: dict[float, LogitCodec], student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, list[str]]:
    """Bytes per sample and, at each temperature, 'loss error / gradient error' of the codec written for it."""
    cells = []
    for temperature, codec in codec_at.items():
        columns = codec.encode(teacher)
        decoded = codec.decode(columns, CLASSES)
        (exact, exact_grad), (approximate, approximate_grad) = (kd_and_gradient(student, target, temperature) for target in (teacher, decoded))
        gradient_error = ((approximate_grad - exact_grad).norm() / exact_grad.norm()).item()
        cells.append(f"{abs(approximate / exact - 1).item():.2e} / {gradient_error:.2e}")
    return table_bytes(columns) / len(teacher), cells


def tail_mass(logits: torch.Tensor, top: torch.Tensor, temperature: float) -> torch.Tensor:
    """The tempered softmax mass outside ``top``, in float64."""
    tempered = logits.double() / temperature
    return (tempered.scatter(1, top, -math.inf).logsumexp(dim=1) - tempered.logsumexp(dim=1)).exp()


def old_tail_mass(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Format 2's decoding at tau 1: 1 - sum of the top-k probabilities, in fp32."""
    top_mass = (logits.topk(k, dim=1).values - logits.logsumexp(dim=1, keepdim=True)).exp().sum(dim=1)
    return (1.0 - top_mass).clamp(min=torch.finfo(torch.float32).tiny)


def print_codec_table(student: torch.Tensor, teacher: torch.Tensor) -> None:
    print("| codec | bytes/sample-epoch | τ=1: KD loss / gradient error | τ=4: KD loss / gradient error |", flush=True)
    print("|---|---|---|---|", flush=True)
    rows: list[tuple[str, dict[float, LogitCodec]]] = [(name, dict.fromkeys(TEMPERATURES, make())) for name, make in CODECS.items()]
    rows += [(f"top-{k}", {tau: TopKLogits(k, tau) for tau in TEMPERATURES}) for k in TOP_K]
    for name, codec_at in rows:
        per_sample, cells = codec_errors(codec_at, student, teacher)
        print(f"| {name} | {per_sample:.0f} | " + " | ".join(cells) + " |", flush=True)


def print_tail_table(generator: torch.Generator, k: int = 5) -> None:
    print(f"\ntop-{k} tail mass, relative error of the decoded tail (1 - top-{k} probability) at each margin of the top class:", flush=True)
    print("| margin | true tail mass (τ=1) | old decoding (τ=1) | now, τ=1 | now, τ=4 |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    for margin in MARGINS:
        logits = imagenet_like_logits(generator, 256, margin)
        top = logits.topk(k, dim=1).indices
        errors = []
        for temperature in TEMPERATURES:
            codec = TopKLogits(k, temperature)
            decoded = codec.decode(codec.encode(logits), CLASSES)
            truth = tail_mass(logits, top, temperature)
            errors.append((tail_mass(decoded, top, temperature) / truth - 1).abs().max().item())
        truth = tail_mass(logits, top, 1.0)
        old = (old_tail_mass(logits, k).double() / truth - 1).abs().max().item()
        print(f"| {margin:g} | {truth.median().item():.1e} | {old:.1e} | {errors[0]:.1e} | {errors[1]:.1e} |", flush=True)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = imagenet_like_logits(generator)
    student = 0.7 * teacher + torch.randn(SAMPLES, CLASSES, generator=generator)
    top1 = teacher.softmax(dim=1).amax(dim=1)
    print(f"teacher cache codecs, {CLASSES} classes, {SAMPLES} samples; teacher's top-1 probability: median {top1.median():.3f}, "
          f"mean {top1.mean():.3f}", flush=True)
    print_codec_table(student, teacher)
    print_tail_table(generator)


if __name__ == "__main__":
    main()
