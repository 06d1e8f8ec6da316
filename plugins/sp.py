"""``sp``: Tung and Mori (ICCV 2019), "Similarity-Preserving Knowledge Distillation".

The batch's flattened feature maps give a Gram matrix G = F F^T [B, B]; each
row is L2-normalised, and the loss is the squared Frobenius distance of the
student's and the teacher's, divided by B^2:

    L = CE(z_s, y) + beta * ||normalize(G_t) - normalize(G_s)||_F^2 / B^2

as RepDistiller's ``distiller_zoo/SP.py`` computes it (row normalisation with
``F.normalize``, eps 1e-12).  Defaults are RepDistiller's benchmark
(``-r 1 -a 0 -b 3000``) on the last stage's feature map (its ``feat[-2]``).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat
from torch import Tensor

from kdcli.method import Batch, StepOutput
from kdcli_plugins._repdistiller import StageFeatureMethod, StageFeatureParams


class SPParams(StageFeatureParams):
    feature_weight: NonNegativeFloat = Field(3000.0, description="beta: weight of the similarity-preserving loss (RepDistiller -b).")
    layers: list[int] | None = Field([-1], min_length=1, description="Student stage indices (0 = stem, -1 = last stage); None = every stage after the stem.")


def similarity_matrix(features: Tensor) -> Tensor:
    """The batch's Gram matrix of flattened features, each row L2-normalised: [B, B]."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    batch = student.shape[0]
    return (similarity_matrix(teacher) - similarity_matrix(student)).pow(2).sum() / (batch * batch)


class SimilarityPreserving(StageFeatureMethod):
    """Match the teacher's pairwise similarities among the batch's feature maps."""

    summary = "SP (Tung & Mori, ICCV 2019): CE + beta * batch-similarity (Gram) matrix distance, last stage (RepDistiller SP.py)."
    Params = SPParams
    params: SPParams

    def training_step(self, batch: Batch) -> StepOutput:
        logits, teacher_logits, pairs = self.paired_stage_features(batch.inputs)
        losses = self.ce_and_kd(logits, teacher_logits, batch.targets)
        with self.full_precision():
            losses["similarity"] = self.params.feature_weight * sum(similarity_loss(student, teacher) for student, teacher in pairs)
        return StepOutput(logits, losses)
