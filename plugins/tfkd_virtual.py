"""``tfkd-virtual``: Teacher-free KD with a hand-designed teacher (Yuan et al., CVPR 2020).

No teacher network.  The virtual teacher puts probability ``a`` on the true
class and spreads ``1 - a`` evenly over the other ``C - 1`` classes:

    p^d_k = a if k == y else (1 - a) / (C - 1)          (a = 0.99; the paper asks a >= 0.9)
    L = (1 - alpha) * CE(z_s, y) + alpha * M * KL(softmax(p^d / tau) || softmax(z_s / tau_s))

Two forms, chosen by options:

* official code (the default, ``loss_kd_regularization`` in the official
  ``my_loss_function.py``, whose numbers are the published ones): the
  temperature divides the probability vector p^d itself, the student is not
  tempered (``tau_s = 1``), and the KL has ``nn.KLDivLoss()``'s scaling,
  KL / classes (``kl_reduction="mean"``).  Defaults alpha 0.95, tau 40, M 1
  are its MobileNetV2 setting.
* paper, ``L = (1 - alpha) CE + alpha KL(p^d_tau || p_tau)``:
  ``temper_student=true`` (``tau_s = tau``), ``kl_reduction="batchmean"``,
  ``multiplier=1``.  As in the paper's formula there is no tau^2 factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor

from kdcli.losses import KLReduction, kl_divergence
from kdcli.method import Batch, Method, MethodParams, StepOutput


def virtual_teacher_distribution(targets: Tensor, num_classes: int, correct_prob: float) -> Tensor:
    """p^d per sample, [B, C]: ``correct_prob`` on the true class, the rest spread evenly."""
    others = (1.0 - correct_prob) / (num_classes - 1)
    distribution = torch.full((targets.shape[0], num_classes), others, device=targets.device)
    return distribution.scatter_(1, targets[:, None], correct_prob)


def virtual_teacher_targets(targets: Tensor, num_classes: int, correct_prob: float, temperature: float) -> Tensor:
    """The official target ``softmax(p^d / tau)``: the temperature acts on probabilities, not logits."""
    return F.softmax(virtual_teacher_distribution(targets, num_classes, correct_prob) / temperature, dim=1)


class TfKDVirtualParams(MethodParams):
    alpha: float = Field(0.95, ge=0.0, le=1.0, description="Weight of the virtual-teacher term; CE weight is 1 - alpha.")
    temperature: PositiveFloat = Field(40.0, description="tau: divides the virtual teacher's probability vector.")
    correct_prob: float = Field(
        0.99, ge=0.9, le=1.0, description="a: the virtual teacher's probability of the true class (paper: a >= 0.9)."
    )
    multiplier: float = Field(1.0, ge=0.0, description="Extra factor M on the virtual-teacher term (official: 1, or 100 for ResNet18).")
    temper_student: bool = Field(
        False, description="false = official code (student softmax(z)); true = paper (student softmax(z / tau))."
    )
    kl_reduction: KLReduction = Field(
        "mean", description="mean = the official code's nn.KLDivLoss() (KL / classes); batchmean = true KL (paper)."
    )


class TfKDVirtual(Method):
    """Distill from a virtual teacher that is 100% accurate and uniform over the wrong classes."""

    roles = frozenset({"distill"})
    teacher_use = "none"
    summary = "Tf-KD with a virtual teacher: probability a on the true class, the rest uniform; no teacher network."
    teacher_note = (
        "its teacher is a hand-designed distribution, probability a on the true class; "
        "to learn from a checkpoint use --method tfkd-self"
    )
    Params = TfKDVirtualParams

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.student_logits(batch.inputs)
        params = self.params
        num_classes = logits.shape[1]
        target = virtual_teacher_targets(batch.targets, num_classes, params.correct_prob, params.temperature)
        student_temperature = params.temperature if params.temper_student else 1.0
        student_log_probs = F.log_softmax(logits.float() / student_temperature, dim=1)
        losses = {
            "ce": (1.0 - params.alpha) * F.cross_entropy(logits, batch.targets),
            "kd": params.alpha * params.multiplier * kl_divergence(student_log_probs, target, params.kl_reduction),
        }
        return StepOutput(logits, losses)
