"""``tfkd-self``: Teacher-free KD by self-training (Yuan et al., CVPR 2020, "Revisiting KD via LSR").

A pretrained network teaches a freshly initialized one, typically a copy of
its own architecture (the checkpoint of a ``standard`` run); without
``--model`` the student gets the teacher's architecture.  Any checkpoint with
the data set's classes can teach, which also covers the paper's reversed KD
(a weaker network teaches a stronger one) and defective KD (an early, poorly
trained checkpoint teaches).

    L = (1 - alpha) * CE(z_s, y) + alpha * M * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau))

Defaults are the official code's MobileNetV2 setting (alpha 0.95, tau 20, M 1)
together with the scaling it was tuned with: ``nn.KLDivLoss()``'s
``reduction="mean"``, i.e. KL / classes (``loss_kd_self`` in the official
``my_loss_function.py``).  ``kl_reduction="batchmean"`` gives the true KL;
the published alpha/tau/M do not carry over to it.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, PositiveFloat

from kdcli.losses import KLReduction, distillation_kl
from kdcli.method import Batch, Method, MethodParams, StepOutput


class TfKDSelfParams(MethodParams):
    alpha: float = Field(0.95, ge=0.0, le=1.0, description="Weight of the KD term; the CE weight is 1 - alpha.")
    temperature: PositiveFloat = Field(20.0, description="Softmax temperature tau of teacher and student.")
    multiplier: float = Field(1.0, ge=0.0, description="Extra factor M on the KD term (official: 1, or 50 for ResNet18).")
    kl_reduction: KLReduction = Field(
        "mean", description="mean = the official code's nn.KLDivLoss() (KL / classes); batchmean = true KL."
    )


class TfKDSelf(Method):
    """Self-training: a pretrained copy of the student (or any checkpoint) teaches it from scratch."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "Tf-KD self-training: a pretrained model (usually the student's own architecture) teaches."
    teacher_note = "usually a standard run of the student's own architecture"
    Params = TfKDSelfParams
    accepts_soft_targets = True  # its only use of the targets is F.cross_entropy

    @classmethod
    def default_model(cls, *, teacher_arch: str | None) -> str | None:
        """Self-training: without ``--model`` the student gets the teacher's architecture."""
        return teacher_arch

    def training_step(self, batch: Batch) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        logits = self.student_logits(batch.inputs)
        params = self.params
        kd = distillation_kl(logits, teacher_logits, params.temperature, params.kl_reduction)
        losses = {
            "ce": (1.0 - params.alpha) * F.cross_entropy(logits, batch.targets),
            "kd": params.alpha * params.multiplier * kd,
        }
        return StepOutput(logits, losses)
