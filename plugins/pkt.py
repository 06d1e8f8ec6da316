"""``pkt``: Passalis and Tefas (ECCV 2018), "Learning Deep Representations with Probabilistic Knowledge Transfer".

Each network's pooled features are L2-normalised; their cosine similarities,
mapped to [0, 1] by (cos + 1) / 2 and normalised per row, are conditional
probabilities p(j | i) over the batch; the loss is the KL from the teacher's
to the student's, averaged over all B^2 entries:

    L = CE(z_s, y) + beta * mean_ij q_ij log((q_ij + eps) / (p_ij + eps)),  eps 1e-7

as RepDistiller's ``distiller_zoo/PKT.py`` computes it (the author's code; NaN
entries of the normalised features set to 0, eps 1e-7 added to each norm and
inside the log).  Defaults are RepDistiller's benchmark (``-r 1 -a 0 -b 30000``)
on the pooled features before the classifier (its ``feat[-1]``).
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat
from torch import Tensor

from kdcli.method import Batch, StepOutput
from kdcli_plugins._repdistiller import PooledFeatureMethod, PooledFeatureParams

PKT_EPS = 1e-7  # the official code's


class PKTParams(PooledFeatureParams):
    feature_weight: NonNegativeFloat = Field(30000.0, description="beta: weight of the probability-transfer KL (RepDistiller -b).")


def cosine_probabilities(features: Tensor, eps: float = PKT_EPS) -> Tensor:
    """Row-normalised (cos + 1) / 2 between the batch's feature vectors, [B, B]."""
    unit = features / (features.norm(dim=1, keepdim=True) + eps)
    unit = unit.masked_fill(unit.isnan(), 0.0)  # as the official code
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def probability_transfer_loss(student: Tensor, teacher: Tensor, eps: float = PKT_EPS) -> Tensor:
    """mean over i, j of q_ij log((q_ij + eps) / (p_ij + eps)): teacher q, student p."""
    p, q = cosine_probabilities(student, eps), cosine_probabilities(teacher, eps)
    return (q * torch.log((q + eps) / (p + eps))).mean()


class PKT(PooledFeatureMethod):
    """Match the teacher's cosine-similarity probabilities among the batch's pooled features."""

    summary = "PKT (Passalis & Tefas, ECCV 2018): CE + beta * KL of cosine-similarity probabilities, pooled features (RepDistiller PKT.py)."
    Params = PKTParams
    params: PKTParams

    def training_step(self, batch: Batch) -> StepOutput:
        logits, teacher_logits, student, teacher = self.pooled_features(batch.inputs)
        losses = self.ce_and_kd(logits, teacher_logits, batch.targets)
        with self.full_precision():
            losses["pkt"] = self.params.feature_weight * probability_transfer_loss(student, teacher)
        return StepOutput(logits, losses)
