"""``at``: Zagoruyko and Komodakis (ICLR 2017), "Paying More Attention to Attention" (attention transfer).

The attention map of a feature map F [B, C, H, W] is the L2-normalised,
flattened channel mean of |F|^p; the loss is the mean squared difference of
the student's and the teacher's maps, summed over the stage pairs:

    L = CE(z_s, y) + beta * sum_l mean((a(F_s^l) - a(F_t^l))^2),  a(F) = normalize(mean_c F^p)

as RepDistiller's ``distiller_zoo/AT.py`` computes it (p 2, the larger map
average-pooled to the smaller's size first; the paper's loss is the L2 norm of
the difference, not its mean square: the code is followed).  Defaults are
RepDistiller's benchmark (``-r 1 -a 0 -b 1000``) on every stage after the stem
(its ``feat[1:-1]``).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor

from kdcli.method import Batch, StepOutput
from kdcli_plugins._repdistiller import StageFeatureMethod, StageFeatureParams


class ATParams(StageFeatureParams):
    feature_weight: NonNegativeFloat = Field(1000.0, description="beta: weight of the summed attention losses (RepDistiller -b).")
    p: PositiveFloat = Field(2.0, description="Exponent of the attention map, mean_c F^p.")


def attention_map(feature: Tensor, p: float) -> Tensor:
    """normalize(mean over channels of F^p), flattened to [B, H*W]."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """Mean squared difference of the two attention maps, the larger feature map pooled to the smaller's size."""
    student_size, teacher_size = student.shape[2:], teacher.shape[2:]
    if student_size[0] > teacher_size[0]:
        student = pool_to(student, teacher_size)
    elif student_size[0] < teacher_size[0]:
        teacher = pool_to(teacher, student_size)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def pool_to(feature: Tensor, size: tuple[int, ...]) -> Tensor:
    """Adaptive average pooling to ``size``; as a plain average pooling where the sizes divide, whose CUDA backward
    is deterministic (adaptive pooling's raises under train.deterministic)."""
    have = feature.shape[2:]
    if all(h % s == 0 for h, s in zip(have, size)):
        return F.avg_pool2d(feature, tuple(h // s for h, s in zip(have, size)))
    return F.adaptive_avg_pool2d(feature, size)


class AttentionTransfer(StageFeatureMethod):
    """Match the teacher's spatial attention maps at each stage."""

    summary = "AT (Zagoruyko & Komodakis, ICLR 2017): CE + beta * attention-map MSE per stage (RepDistiller AT.py)."
    Params = ATParams
    params: ATParams

    def training_step(self, batch: Batch) -> StepOutput:
        logits, teacher_logits, pairs = self.paired_stage_features(batch.inputs)
        losses = self.ce_and_kd(logits, teacher_logits, batch.targets)
        with self.full_precision():
            losses["attention"] = self.params.feature_weight * sum(attention_loss(student, teacher, self.params.p) for student, teacher in pairs)
        return StepOutput(logits, losses)
