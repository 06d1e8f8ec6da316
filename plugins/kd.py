"""``kd``: Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network".

L = w_ce * CE(z_s, y) + w_kd * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)).
Defaults follow RepDistiller (tau 4, 0.1 / 0.9); the SoTeacher student script
uses 0.5 / 0.5 (``--set method.ce_weight=0.5 --set method.kd_weight=0.5``).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, PositiveFloat

from kdcli.losses import KLReduction, distillation_kl
from kdcli.method import Batch, Method, MethodParams, StepOutput


class KDParams(MethodParams):
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature tau of both distributions.")
    ce_weight: float = Field(0.1, ge=0.0, description="Weight of the cross-entropy with the labels.")
    kd_weight: float = Field(0.9, ge=0.0, description="Weight of the tau^2-scaled KL to the teacher.")
    kl_reduction: KLReduction = Field(
        "batchmean", description="batchmean = true KL; mean = legacy nn.KLDivLoss() scaling (KL / classes)."
    )


class HintonKD(Method):
    """Match the teacher's temperature-softened distribution."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "Hinton KD: CE plus tau^2-scaled KL to the teacher's softened outputs."
    Params = KDParams
    accepts_soft_targets = True  # its only use of the targets is F.cross_entropy

    def training_step(self, batch: Batch) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        logits = self.student_logits(batch.inputs)
        params = self.params
        losses = {
            "ce": params.ce_weight * F.cross_entropy(logits, batch.targets),
            "kd": params.kd_weight
            * distillation_kl(logits, teacher_logits, params.temperature, params.kl_reduction),
        }
        return StepOutput(logits, losses)
