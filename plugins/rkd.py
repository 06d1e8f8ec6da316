"""``rkd``: Park, Kim, Lu, Cho (CVPR 2019), "Relational Knowledge Distillation".

On the pooled features (flattened to [B, D]) of the batch, the student matches
the teacher's pairwise distances, each network's divided by its mean positive
distance, and the angles of every triplet (cosines between the unit
differences e_ij and e_kj), each by the Huber (smooth L1, threshold 1) loss:

    L = CE(z_s, y) + beta * (w_d * huber(d_s / mean d_s, d_t / mean d_t) + w_a * huber(cos_s, cos_t))

as RepDistiller's ``distiller_zoo/RKD.py`` computes it: distances from
|a|^2 + |b|^2 - 2 a.b clamped at 1e-12 (the diagonal set to 0), the mean over
the distances > 0, the angle term over all B^3 entries (the degenerate ones, a
zero difference, are 0 for both networks), each Huber loss a mean.  Defaults
are RepDistiller's (w_d 25, w_a 50, ``-r 1 -a 0 -b 1``) on the pooled features
before the classifier (its ``feat[-1]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat
from torch import Tensor

from kdcli.method import Batch, StepOutput
from kdcli_plugins._repdistiller import PooledFeatureMethod, PooledFeatureParams

DISTANCE_FLOOR = 1e-12  # squared distances are clamped here before the square root (the official code's)


class RKDParams(PooledFeatureParams):
    feature_weight: NonNegativeFloat = Field(1.0, description="beta: weight of the whole RKD loss (RepDistiller -b).")
    distance_weight: NonNegativeFloat = Field(25.0, description="w_d: weight of the distance term.")
    angle_weight: NonNegativeFloat = Field(50.0, description="w_a: weight of the angle term.")


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances [B, B] from the Gram matrix, the diagonal exactly 0."""
    squared_norms = embeddings.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * embeddings @ embeddings.t()).clamp(min=DISTANCE_FLOOR)
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return squared.sqrt().masked_fill(eye, 0.0)


def normalized_distances(embeddings: Tensor) -> Tensor:
    distances = pairwise_distances(embeddings)
    return distances / distances[distances > 0].mean()


def triplet_angles(embeddings: Tensor) -> Tensor:
    """cos of the angle at j between i and k, for all (j, i, k): [B, B, B], flattened."""
    differences = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)  # [j, i] = e_i - e_j
    return (differences @ differences.transpose(1, 2)).flatten()


def rkd_terms(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(distance, angle) Huber losses; the teacher's side carries no gradient."""
    with torch.no_grad():
        teacher_distances, teacher_angles = normalized_distances(teacher), triplet_angles(teacher)
    distance = F.smooth_l1_loss(normalized_distances(student), teacher_distances)
    angle = F.smooth_l1_loss(triplet_angles(student), teacher_angles)
    return distance, angle


class RKD(PooledFeatureMethod):
    """Match the teacher's normalised pairwise distances and triplet angles among the batch's pooled features."""

    summary = "RKD (Park et al., CVPR 2019): CE + beta * (25 distance + 50 angle) Huber losses, pooled features (RepDistiller RKD.py)."
    Params = RKDParams
    params: RKDParams

    def training_step(self, batch: Batch) -> StepOutput:
        logits, teacher_logits, student, teacher = self.pooled_features(batch.inputs)
        params = self.params
        with self.full_precision():
            distance, angle = rkd_terms(student, teacher)
        losses = self.ce_and_kd(logits, teacher_logits, batch.targets)
        losses["distance"] = params.feature_weight * params.distance_weight * distance
        losses["angle"] = params.feature_weight * params.angle_weight * angle
        return StepOutput(logits, losses)
