"""``soteacher``: Dong, Liu and Shang (ICLR 2024), "Toward Student-Oriented Teacher Network Training for KD".

A teacher trained to approximate the true label distribution p*(x) on its
training inputs rather than to fit the labels:

    L = CE(z, y) + lambda_LR * R_Lip(theta) + lambda_CR(e) * (1/B) sum_i ||p_i - pbar_i||^2

* ``R_Lip``: the official code's sum over layers of per-layer upper bounds on
  the Lipschitz constant (entrywise l1 norm of a conv kernel, the largest
  ``|gamma| / sqrt(running_var + eps)`` of a batch norm, the largest column
  l1 norm of a linear weight).  Layers are found by module type, so it works
  for any timm model.
* ``pbar``: a per-sample temporal-ensembling bank, the cumulative mean of the
  model's past predictions on that sample with the first epoch counted twice
  (the official update ``pbar <- (1 - w) pbar + w p``, ``w = 1 / (1 + k)``,
  k = 0 in epoch 1 and the 1-based epoch afterwards).  The loss is taken
  against the bank before this step's update; epoch 1 has no consistency loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt
from torch import Tensor, nn

from kdcli.method import Batch, Method, MethodContext, MethodError, MethodParams, StepOutput, Teacher

ConsistencySchedule = Literal["linear", "step", "cosine", "cycle", "constant"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class SoTeacherParams(MethodParams):
    lipschitz_weight: NonNegativeFloat = Field(1e-5, description="lambda_LR, weight of the Lipschitz bound R_Lip.")
    lipschitz_include_head: bool = Field(
        True, description="Include the classifier in R_Lip (official code); false = feature extractor only (paper)."
    )
    consistency_weight: NonNegativeFloat = Field(1.0, description="lambda_max, the consistency weight the schedule reaches.")
    consistency_schedule: ConsistencySchedule = Field(
        "linear", description="How lambda_CR grows over the run: linear, step, cosine, cycle, constant."
    )
    consistency_start_at: NonNegativeInt = Field(
        50, description="step schedule: lambda_CR is 0 while epoch - 1 < start_at, then lambda_max."
    )


def consistency_weight(schedule: ConsistencySchedule, epoch: int, epochs: int, max_weight: float, start_at: int) -> float:
    """lambda_CR used throughout 1-based ``epoch`` of a run of ``epochs`` (the official schedules)."""
    progress = epoch / epochs
    if schedule == "linear":
        return max_weight * progress
    if schedule == "step":
        return 0.0 if epoch - 1 < start_at else max_weight
    if schedule == "cosine":
        return max_weight * math.cos((1.0 - progress) * math.pi / 2)
    if schedule == "cycle":
        return max_weight * math.sqrt(1.0 - (1.0 - progress) ** 2)
    return max_weight


def bank_update_weight(epoch: int) -> float:
    """w in ``pbar <- (1 - w) pbar + w p``: 1 in epoch 1, then 1 / (1 + epoch), a cumulative mean counting epoch 1 twice."""
    return 1.0 if epoch == 1 else 1.0 / (1.0 + epoch)


@dataclass(frozen=True)
class LipschitzLayers:
    """The layers R_Lip sums over, found once by module type.

    The bound is computed with a handful of whole-network tensor ops rather
    than a few per layer, so its cost stays small next to a training step
    (on a GPU, per-layer ops would mean hundreds of tiny kernel launches).
    """

    convs: tuple[nn.Module, ...]
    batch_norms: tuple[nn.Module, ...]
    linears: tuple[nn.Module, ...]
    norm_layer_ids: Tensor  # for each batch-norm channel, the position of its layer in batch_norms
    norm_eps: Tensor  # each batch-norm channel's eps

    @classmethod
    def of(cls, model: nn.Module, *, include_head: bool) -> LipschitzLayers:
        excluded = set() if include_head else {id(module) for head in _classifiers(model) for module in head.modules()}
        # modules() yields every module once, shared ones too.
        kept = [module for module in model.modules() if id(module) not in excluded]
        # Without running statistics a batch norm divides by batch statistics: no fixed bound exists.
        norms = tuple(m for m in kept if isinstance(m, BATCH_NORM_TYPES) and m.running_var is not None)
        device = norms[0].running_var.device if norms else torch.device("cpu")
        sizes = torch.tensor([m.running_var.numel() for m in norms], dtype=torch.int64, device=device)
        return cls(
            convs=tuple(module for module in kept if isinstance(module, CONV_TYPES)),
            batch_norms=norms,
            linears=tuple(module for module in kept if isinstance(module, nn.Linear)),
            norm_layer_ids=torch.arange(len(norms), device=device).repeat_interleave(sizes),
            norm_eps=torch.tensor([m.eps for m in norms], device=device).repeat_interleave(sizes),
        )

    def bound(self) -> Tensor:
        """R_Lip: differentiable in the weights and batch-norm scales, constant in running statistics."""
        terms = [module.weight.abs().sum(dim=0).max() for module in self.linears]
        if self.convs:
            # The sum of every kernel's entrywise l1 norm is the l1 norm of all kernels together.
            terms.append(torch.cat([module.weight.reshape(-1) for module in self.convs]).abs().sum())
        if self.batch_norms:
            terms.append(self._batch_norm_maxima().sum())
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    def _batch_norm_maxima(self) -> Tensor:
        """max_c |gamma_c| / sqrt(running_var_c + eps) of every batch norm (gamma = 1 when not affine)."""
        gammas = torch.cat([torch.ones_like(m.running_var) if m.weight is None else m.weight for m in self.batch_norms])
        variances = torch.cat([module.running_var for module in self.batch_norms])
        ratios = gammas.abs() * (variances + self.norm_eps).rsqrt()
        maxima = ratios.new_zeros(len(self.batch_norms))
        return maxima.scatter_reduce(0, self.norm_layer_ids, ratios, reduce="amax", include_self=False)


def _classifiers(model: nn.Module) -> Iterable[nn.Module]:
    """The classifier head(s) of the outermost model that has timm's ``get_classifier``."""
    for module in model.modules():
        get_classifier = getattr(module, "get_classifier", None)
        if callable(get_classifier):
            head = get_classifier()
            return head if isinstance(head, (tuple, list)) else (head,)
    raise MethodError(
        "method.lipschitz_include_head=false needs a model with get_classifier() (every timm model has one); "
        f"{type(model).__name__} has none"
    )


class SoTeacher(Method):
    """ERM plus the Lipschitz bound plus temporal-ensembling consistency: a student-oriented teacher."""

    roles = frozenset({"teach"})
    teacher_use = "none"
    summary = "SoTeacher: CE + lambda_LR * Lipschitz bound + scheduled consistency to a temporal ensemble."
    Params = SoTeacherParams
    accepts_soft_targets = True  # targets feed only F.cross_entropy; with mixing the bank follows mixed views

    def __init__(self, params: SoTeacherParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        self.params: SoTeacherParams = params
        self.lipschitz_layers = LipschitzLayers.of(student, include_head=params.lipschitz_include_head)
        self.register_buffer("bank", torch.zeros(context.num_train, context.num_classes, device=context.device))
        # Plain numbers: the step runs eagerly (only the student's forward is compiled), so nothing guards them.
        self.epoch = 1
        self.cr_weight = 0.0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        params = self.params
        self.cr_weight = consistency_weight(
            params.consistency_schedule, epoch, self.context.epochs, params.consistency_weight, params.consistency_start_at
        )

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.student_logits(batch.inputs)
        probs = logits.float().softmax(dim=1)
        lipschitz = self.lipschitz_layers.bound().to(logits.device)
        if self.epoch == 1:
            consistency = torch.zeros((), device=logits.device)
        else:
            consistency = (probs - self.bank[batch.index]).pow(2).sum(dim=1).mean()
        losses = {
            "ce": F.cross_entropy(logits, batch.targets),
            "lipschitz": self.params.lipschitz_weight * lipschitz,
            "consistency": self.cr_weight * consistency,
        }
        logs = {"lipschitz_bound": lipschitz.detach(), "consistency_mse": consistency.detach()}
        return StepOutput(logits, losses, logs)

    def after_step(self, batch: Batch, output: StepOutput) -> None:
        """The loss above was taken against the bank before this step's predictions join it."""
        self.update_bank(batch.index, output.logits.detach().float().softmax(dim=1))

    @torch.no_grad()
    def update_bank(self, index: Tensor, probs: Tensor) -> None:
        """Fold this step's predictions of every rank into the bank, identically on every rank."""
        index, probs = self.context.all_gather(index), self.context.all_gather(probs)
        self.bank[index] = torch.lerp(self.bank[index], probs, bank_update_weight(self.epoch))

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {"consistency_weight": self.cr_weight}
