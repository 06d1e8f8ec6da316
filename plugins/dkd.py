"""``dkd``: Zhao, Cui, Song, Qiu, Liang (CVPR 2022), "Decoupled Knowledge Distillation".

KD splits into a target-class and a non-target-class term,
KD = TCKD + (1 - p_t^T) * NCKD; DKD weighs them independently:

    L = w_ce * CE(z_s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

* TCKD: tau^2 * KL(b^T || b^S) of the binary [p_target, 1 - p_target] of softmax(z / tau);
* NCKD: tau^2 * KL(p_hat^T || p_hat^S) over the non-target classes, renormalised.

As mdistiller's ``mdistiller/distillers/DKD.py``: both KLs summed over classes
and divided by the batch size; for NCKD the tempered target logit is lowered
by 1000 before the softmax rather than removed; the warm-up is linear in the
(1-based) epoch.  TCKD's binary log-probabilities are computed in log space
(logsumexp) where the official code takes ``log`` of the summed probabilities:
the same value, finite also for a student all but certain of the target.
Defaults are mdistiller's CIFAR-100 ``configs/cifar100/dkd/*.yaml``: alpha 1,
beta 8 (some pairs use another beta), tau 4, CE weight 1, warm-up 20 epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat
from torch import Tensor

from kdcli.losses import kl_divergence
from kdcli.method import Batch, Method, MethodParams, StepOutput

# Subtracted from the tempered target logit for NCKD (the official value): exp(-1000) is 0 in float32, -inf would give NaN.
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


def binary_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] of softmax(scaled_logits), [B, 2]."""
    log_probs = F.log_softmax(scaled_logits, dim=1)
    log_target = log_probs.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_rest = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=1)


def decoupled_kd_terms(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each tau^2-scaled, summed over classes and averaged over the batch."""
    student, teacher = student_logits / temperature, teacher_logits / temperature
    target_mask = F.one_hot(targets, num_classes=student.shape[1]).bool()
    tckd = kl_divergence(binary_log_probs(student, target_mask), binary_log_probs(teacher, target_mask).exp())
    offset = TARGET_LOGIT_OFFSET * target_mask
    nckd = kl_divergence(F.log_softmax(student - offset, dim=1), F.softmax(teacher - offset, dim=1))
    return tckd * temperature**2, nckd * temperature**2


class DKD(Method):
    """Decoupled KD: separately weighted target-class and non-target-class KD terms."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "DKD (Zhao et al., CVPR 2022): CE + alpha*TCKD + beta*NCKD, warmed up over 20 epochs (mdistiller DKD.py)."
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
        tckd, nckd = decoupled_kd_terms(logits.float(), teacher_logits.float(), batch.targets, params.temperature)
        losses = {
            "ce": params.ce_weight * F.cross_entropy(logits, batch.targets),
            "tckd": self.kd_weight * params.alpha * tckd,
            "nckd": self.kd_weight * params.beta * nckd,
        }
        return StepOutput(logits, losses)
