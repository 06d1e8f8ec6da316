"""``dkd``: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

The KD loss splits into a target-class term and a non-target-class term,

    KD = TCKD + (1 - p_t^T) * NCKD,

and DKD weights them independently, dropping the coupling factor:

    L = w_ce * CE(z_s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

* TCKD: tau^2 * KL(b^T || b^S), where b = [p_target, 1 - p_target] are the binary
  target / non-target probabilities of softmax(z / tau);
* NCKD: tau^2 * KL(p_hat^T || p_hat^S) over the non-target classes only, the
  distributions renormalized without the target class. As in the official code
  (mdistiller ``DKD.py``), the target logit is pushed down by a large constant
  before the softmax instead of being removed.

Both KLs are summed over classes and averaged over the batch.  Defaults are
mdistiller's CIFAR-100 settings: alpha 1, beta 8, tau 4, CE weight 1, a linear
warm-up of the KD weight over the first 20 epochs (epochs are 1-based, so the
first epoch uses 1/20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat
from torch import Tensor

from kdcli.losses import kl_divergence
from kdcli.method import Batch, Method, MethodParams, StepOutput

# Subtracted from the tempered target logit for NCKD (the official code's value):
# its probability becomes exp(-1000) = 0 in float32, while -inf would make the KL NaN.
TARGET_LOGIT_OFFSET = 1000.0


class DKDParams(MethodParams):
    alpha: NonNegativeFloat = Field(1.0, description="Weight of the target-class term TCKD.")
    beta: NonNegativeFloat = Field(8.0, description="Weight of the non-target-class term NCKD.")
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature tau of both distributions.")
    ce_weight: NonNegativeFloat = Field(1.0, description="Weight of the cross-entropy with the labels.")
    warmup_epochs: NonNegativeInt = Field(
        20, description="The KD weight rises linearly as min(epoch / warmup_epochs, 1); 0 = full weight from epoch 1."
    )


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup_epochs, 1) for a 1-based epoch; 1 without warm-up."""
    return 1.0 if warmup_epochs == 0 else min(epoch / warmup_epochs, 1.0)


def _binary_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] of softmax(scaled_logits), in log space (no log of a difference)."""
    log_probs = F.log_softmax(scaled_logits, dim=1)
    log_target = log_probs.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_rest = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=1)


def decoupled_kd_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each tau^2-scaled, summed over classes and averaged over the batch."""
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    target_mask = F.one_hot(targets, num_classes=student.shape[1]).bool()

    tckd = kl_divergence(_binary_log_probs(student, target_mask), _binary_log_probs(teacher, target_mask).exp())
    offset = TARGET_LOGIT_OFFSET * target_mask
    nckd = kl_divergence(F.log_softmax(student - offset, dim=1), F.softmax(teacher - offset, dim=1))
    scale = temperature**2
    return tckd * scale, nckd * scale


class DKD(Method):
    """Decoupled KD: separately weighted target-class and non-target-class KD terms."""

    api_version = "3.0"  # the kdcli plugin API this was written against (checked at load)
    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "Decoupled KD (CVPR 2022): CE + alpha*TCKD + beta*NCKD, KD weight warmed up over 20 epochs."
    Params = DKDParams
    params: DKDParams
    epoch = 1  # the engine announces each epoch (also after --resume): no state to save

    @property
    def kd_weight(self) -> float:
        return warmup_factor(self.epoch, self.params.warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {"kd_weight": self.kd_weight}

    def training_step(self, batch: Batch) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        logits = self.student_logits(batch.inputs)
        params = self.params
        tckd, nckd = decoupled_kd_terms(logits, teacher_logits, batch.targets, params.temperature)
        losses = {
            "ce": params.ce_weight * F.cross_entropy(logits, batch.targets),
            "tckd": self.kd_weight * params.alpha * tckd,
            "nckd": self.kd_weight * params.beta * nckd,
        }
        return StepOutput(logits, losses)
