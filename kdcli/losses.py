"""Loss functions shared by several methods: pure functions of tensors."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

KLReduction = Literal["batchmean", "mean"]


def kl_divergence(student_log_probs: Tensor, teacher_probs: Tensor, reduction: KLReduction = "batchmean") -> Tensor:
    """KL(teacher || student) from log-probabilities and probabilities.

    ``batchmean`` divides the summed KL by the batch size (the correct KL);
    ``mean`` divides by batch size times classes, which is what ``nn.KLDivLoss()``
    did by default and some published numbers were produced with.  Both are
    computed from the sum explicitly: PyTorch has announced that its own
    ``reduction="mean"`` will change meaning.
    """
    summed = F.kl_div(student_log_probs, teacher_probs, reduction="sum")
    divisor = student_log_probs.shape[0] if reduction == "batchmean" else student_log_probs.numel()
    return summed / divisor


def distillation_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: KLReduction = "batchmean",
) -> Tensor:
    """Hinton's KD term: tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau))."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=1)
    return kl_divergence(student_log_probs, teacher_probs, reduction) * temperature**2


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a probability vector per sample, averaged over the batch."""
    return -(target_probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
