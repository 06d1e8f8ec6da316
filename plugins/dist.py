"""``dist``: Huang, You, Wang, Qian, Xu (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher" (DIST).

DIST replaces KD's KL with Pearson correlations of the tempered class
probabilities Y = softmax(Z / tau), row-wise (inter-class: each sample's
ranking of the classes) and column-wise (intra-class: each class's ranking of
the batch's samples):

    L = w_ce * CE(z_s, y) + beta * tau^2 * (1 - mean_i rho(Y_s[i], Y_t[i]))
                          + gamma * tau^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))

rho is the official code's Pearson correlation, the cosine of the centred
vectors with 1e-8 added to the product of norms (hunto/DIST_KD
``losses/dist_kd.py``; mdistiller's ``DIST.py`` is the same).  Defaults are the
paper's CIFAR-100 setting: tau 4, beta = gamma = 2, CE weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor

from kdcli.method import Batch, Method, MethodParams, StepOutput

PEARSON_EPS = 1e-8  # the official code's, added to the product of the norms


class DISTParams(MethodParams):
    beta: NonNegativeFloat = Field(2.0, description="Weight of the inter-class relation (rows: per sample).")
    gamma: NonNegativeFloat = Field(2.0, description="Weight of the intra-class relation (columns: per class).")
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature tau; both terms are tau^2-scaled.")
    ce_weight: NonNegativeFloat = Field(1.0, description="Weight of the cross-entropy with the labels.")


def row_pearson(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def relation_losses(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(inter-class, intra-class) relation losses, each tau^2-scaled."""
    student = F.softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - row_pearson(student, teacher).mean()
    intra = 1 - row_pearson(student.t(), teacher.t()).mean()
    scale = temperature**2
    return inter * scale, intra * scale


class DIST(Method):
    """Match the teacher's class relations per sample and per class (Pearson), not its exact probabilities."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "DIST (Huang et al., NeurIPS 2022): CE + Pearson inter- and intra-class relations to the teacher (hunto/DIST_KD)."
    Params = DISTParams
    params: DISTParams
    accepts_soft_targets = True  # the targets only feed F.cross_entropy

    def training_step(self, batch: Batch) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        logits = self.student_logits(batch.inputs)
        params = self.params
        inter, intra = relation_losses(logits.float(), teacher_logits.float(), params.temperature)
        losses = {
            "ce": params.ce_weight * F.cross_entropy(logits, batch.targets),
            "inter": params.beta * inter,
            "intra": params.gamma * intra,
        }
        return StepOutput(logits, losses)
