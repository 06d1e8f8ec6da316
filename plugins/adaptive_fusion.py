"""``adaptive-fusion``: a per-sample fusion ratio between the teacher and the labels.

Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu (ICLR 2024), "Less or More From Teacher:
Exploiting Trilateral Geometry for Knowledge Distillation" (TGeo-KD), with the
paper's cheap baselines as variants of the same loss. For sample i:

    L_i = alpha_i * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)) + (1 - alpha_i) * CE(z_s, y_i)

``ratio`` chooses where alpha_i comes from; all variants share this loss code,
so comparisons between them are fair:

* ``learned`` (TGeo-KD): alpha_i = sigmoid(f_w(h_i)), f_w an MLP 9C -> hidden -> 1
  (ReLU), on the trilateral geometry of student S, teacher T, label G and the
  teacher's class mean T̄ of the sample's class:
  h = [S, T, G, T̄, (T̄-S)^2, (G-S)^2, (T-S)^2, (T-G)^2, (T̄-G)^2].
  w is trained by bilevel optimization: the upper objective is the student's
  cross-entropy on a held-out validation batch after one *virtual* SGD step
  of the alpha-weighted training loss, F(w) = CE(f(x_val; theta - eta * grad_theta L_train(theta, w))).
  The real student step then uses alpha from the updated w, detached.
* ``ada`` (ADA-KD): alpha_i = max(0, p_t(y_i) - mean_{k != y_i} p_t(k)).
* ``wls`` (WLS-KD): alpha_i = 1 - exp(-CE_s,i / CE_t,i).
* ``fixed``: alpha_i = ``alpha`` (with the defaults this is ``kd`` term for term).

Choices where the paper leaves room (ours):

* S = softmax(z_s) is detached: alpha is a weight, not a second path for the
  student's gradient (so the real step's gradient is that of a weighted loss).
  S, T, G and T̄ are all at temperature 1.
* T̄_c is the teacher's mean probability vector over the *training* split's
  samples labelled c (training labels; never validation or test data), from one
  un-augmented teacher pass before the first epoch. ``class_means=epoch``
  replaces it after every epoch with the mean over that epoch's (augmented)
  training batches, at no extra cost. A class with no training sample gets the
  uniform vector.
* The virtual step is plain SGD (no momentum or weight decay) with step size
  ``virtual_lr``; with the default Adam for w its scale hardly matters, since it
  only scales the hypergradient. The hypergradient is exact, second order through
  that step: because alpha enters the training loss linearly, the mixed second
  derivative reduces to one directional derivative of every sample's KD - CE along
  the validation gradient, taken by forward-mode AD over ``torch.func.functional_call``
  (cheaper than double backward, same value). ``first_order`` takes it by a central
  finite difference instead (DARTS, Liu et al. 2019, eq. 7): first derivatives only.
* Batch norm: the virtual step reuses the real step's forward pass on the training
  batch (so running statistics move once, as in any step); every other
  virtual forward pass, the validation one included, runs in train mode (batch
  statistics) on *copies* of the buffers.
* The MLP's output bias starts at logit(``alpha``): the learned ratio starts
  where ``fixed`` stays, and differs from it only by what the bilevel update learns.
* Validation batches come from the held-out split (``--val-split``), un-augmented,
  reshuffled each epoch with the engine's per-epoch seed, so a resumed run replays them.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdcli.losses import KLReduction
from kdcli.method import Batch, Method, MethodContext, MethodError, MethodParams, StepOutput, Teacher

Ratio = Literal["learned", "ada", "wls", "fixed"]
GEOMETRY_BLOCKS = 9  # h holds nine C-dimensional blocks


class AdaptiveFusionParams(MethodParams):
    ratio: Ratio = Field(
        "learned", description="learned = TGeo-KD (bilevel MLP); ada = ADA-KD; wls = WLS-KD; fixed = alpha for every sample."
    )
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="The fixed ratio, and the learned ratio's starting value.")
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature tau of the KD term.")
    kl_reduction: KLReduction = Field(
        "batchmean", description="batchmean = true KL; mean = legacy nn.KLDivLoss() scaling (KL / classes)."
    )
    hidden: PositiveInt = Field(128, description="Width of the fusion MLP's hidden layer (learned).")
    meta_every: PositiveInt = Field(1, description="Update the fusion network every k training steps (learned).")
    first_order: bool = Field(False, description="Finite-difference hypergradient instead of double backward (learned).")
    meta_optimizer: Literal["adam", "sgd"] = Field("adam", description="Optimizer of the fusion network (learned).")
    meta_lr: PositiveFloat = Field(1e-3, description="Learning rate of the fusion network (learned).")
    virtual_lr: PositiveFloat = Field(0.05, description="Step size of the virtual SGD step of the student (learned).")
    val_batch_size: PositiveInt | None = Field(None, description="Validation batch size; None = the training batch size.")
    class_means: Literal["once", "epoch"] = Field(
        "once", description="T̄ from one teacher pass before training, or refreshed from each epoch's training batches."
    )
    fd_epsilon: PositiveFloat = Field(0.01, description="Finite-difference step over |validation gradient| (first_order).")


# -- the loss and the ratios ---------------------------------------------------------------------


def _full_precision(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) become float32; float64 stays float64 (for gradient checks)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def per_sample_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float, reduction: KLReduction
) -> tuple[Tensor, Tensor]:
    """``(tau^2 * KL_i, CE_i)`` per sample; ``mean`` divides KL_i by the class count like ``nn.KLDivLoss()``."""
    student_log_probs = F.log_softmax(_full_precision(student_logits) / temperature, dim=1)
    teacher_probs = F.softmax(_full_precision(teacher_logits) / temperature, dim=1)
    kd = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(dim=1) * temperature**2
    if reduction == "mean":
        kd = kd / student_logits.shape[1]
    ce = F.cross_entropy(_full_precision(student_logits), targets, reduction="none")
    return kd, ce


def fused_loss(alpha: Tensor, kd: Tensor, ce: Tensor) -> Tensor:
    return (alpha * kd + (1 - alpha) * ce).mean()


def ada_ratio(teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """ADA-KD: the teacher's margin of the labelled class over the mean of the others, floored at 0."""
    probs = F.softmax(_full_precision(teacher_logits), dim=1)
    labelled = probs.gather(1, targets[:, None]).squeeze(1)
    others_mean = (1 - labelled) / (probs.shape[1] - 1)
    return (labelled - others_mean).clamp(min=0)


def wls_ratio(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """WLS-KD: 1 - exp(-CE_student / CE_teacher): more teacher where the teacher fits the label better."""
    student_ce = F.cross_entropy(_full_precision(student_logits), targets, reduction="none")
    teacher_ce = F.cross_entropy(_full_precision(teacher_logits), targets, reduction="none")
    return 1 - torch.exp(-student_ce / teacher_ce.clamp(min=1e-8))


def trilateral_geometry(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, class_means: Tensor) -> Tensor:
    """h = [S, T, G, T̄, (T̄-S)^2, (G-S)^2, (T-S)^2, (T-G)^2, (T̄-G)^2], S detached."""
    student = F.softmax(_full_precision(student_logits.detach()), dim=1)
    teacher = F.softmax(_full_precision(teacher_logits), dim=1)
    label = F.one_hot(targets, student.shape[1]).to(student.dtype)
    class_mean = class_means[targets]
    blocks = [student, teacher, label, class_mean]
    blocks += [(a - b) ** 2 for a, b in ((class_mean, student), (label, student), (teacher, student), (teacher, label), (class_mean, label))]
    return torch.cat(blocks, dim=1)


class FusionNetwork(nn.Module):
    """f_w: geometry h -> alpha in (0, 1), in the network's own precision (float32 under autocast too)."""

    def __init__(self, num_classes: int, hidden: int, initial_alpha: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(GEOMETRY_BLOCKS * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        clamped = min(max(initial_alpha, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.layers[-1].bias.fill_(math.log(clamped / (1 - clamped)))

    def forward(self, geometry: Tensor) -> Tensor:
        with torch.autocast(geometry.device.type, enabled=False):
            return torch.sigmoid(self.layers(geometry.to(self.layers[0].weight.dtype))).squeeze(1)


# -- the bilevel update ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BilevelProblem:
    """One upper-level update: a training batch with its teacher logits, and a validation batch."""

    inputs: Tensor
    targets: Tensor
    teacher_logits: Tensor
    class_means: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    temperature: float
    kl_reduction: KLReduction
    virtual_lr: float


def _student_state(student: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    parameters = {name: value for name, value in student.named_parameters() if value.requires_grad}
    # Copies: virtual forward passes must not move the real batch-norm running statistics.
    buffers = {name: value.clone() for name, value in student.named_buffers()}
    return parameters, buffers


def _kd_minus_ce(student: nn.Module, parameters: dict[str, Tensor], buffers: dict[str, Tensor], problem: BilevelProblem) -> Tensor:
    """D_i = KD_i - CE_i for every sample of the training batch, at ``parameters``."""
    logits = functional_call(student, (parameters, buffers), (problem.inputs,))
    kd, ce = per_sample_terms(logits, problem.teacher_logits, problem.targets, problem.temperature, problem.kl_reduction)
    return kd - ce


def _alpha(fusion: FusionNetwork, logits: Tensor, problem: BilevelProblem) -> Tensor:
    return fusion(trilateral_geometry(logits, problem.teacher_logits, problem.targets, problem.class_means))


def _validation_loss(
    student: nn.Module, parameters: dict[str, Tensor], buffers: dict[str, Tensor], problem: BilevelProblem
) -> Tensor:
    logits = functional_call(student, (parameters, buffers), (problem.val_inputs,))
    return F.cross_entropy(_full_precision(logits), problem.val_targets)


def hypergradient(
    student: nn.Module,
    fusion: FusionNetwork,
    problem: BilevelProblem,
    *,
    first_order: bool = False,
    fd_epsilon: float = 0.01,
    training_logits: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """``(F(w), dF/dw)`` for the fusion network's parameters; the student is left untouched.

    ``training_logits``: the student's logits on ``problem.inputs`` from a forward pass
    the caller reuses for its real step (its graph is kept); None = a forward pass of
    its own, on copies of the buffers.

    With theta' = theta - eta * g(w), g = grad_theta L_train and v = grad F at theta',
    dF/dw = (d theta'/dw)^T v = -eta * d/dw [v . g(theta, w)]. The training loss is
    L_train = mean_i CE_i + alpha_i(w) * D_i with D_i = KD_i - CE_i, so
    v . g = mean_i (v . grad_CE_i) + mean_i alpha_i(w) * (v . grad_theta D_i), and
    dF/dw = -eta * d/dw mean_i alpha_i(w) * (v . grad_theta D_i): the second derivative
    reduces to one directional derivative of every D_i along v, taken by forward-mode
    AD (exact) or by a central difference (``first_order``: first derivatives only).
    """
    parameters, buffers = _student_state(student)
    if training_logits is None:
        training_logits = functional_call(student, (parameters, buffers), (problem.inputs,))
    kd, ce = per_sample_terms(training_logits, problem.teacher_logits, problem.targets, problem.temperature, problem.kl_reduction)
    alpha = _alpha(fusion, training_logits, problem)
    training_loss = fused_loss(alpha.detach(), kd, ce)
    grads = torch.autograd.grad(training_loss, list(parameters.values()), retain_graph=True, allow_unused=True)
    virtual = {
        name: (value if grad is None else value - problem.virtual_lr * grad).detach().requires_grad_()
        for (name, value), grad in zip(parameters.items(), grads)
    }
    loss = _validation_loss(student, virtual, buffers, problem)
    direction = dict(zip(virtual, _grads_or_zeros(loss, list(virtual.values()))))
    parameters = {name: value.detach() for name, value in parameters.items()}
    if first_order:
        directional = _central_difference(student, parameters, buffers, problem, direction, fd_epsilon)
    else:
        directional = _forward_mode_derivative(student, parameters, buffers, problem, direction)
    surrogate = -problem.virtual_lr * (alpha * directional.detach()).mean()
    return loss.detach(), _grads_or_zeros(surrogate, list(fusion.parameters()))


def _forward_mode_derivative(
    student: nn.Module, parameters: dict[str, Tensor], buffers: dict[str, Tensor], problem: BilevelProblem, direction: dict[str, Tensor]
) -> Tensor:
    """v . grad_theta D_i for every sample i in one forward pass with tangents (forward-mode AD).

    ``torch.autograd.forward_ad`` rather than ``torch.func.jvp``: batch norm updates its
    (copied) running statistics in place, which functorch transforms refuse.  Attention
    runs on the math kernel: the fused ones (flash, memory-efficient) have no forward-mode rule.
    """
    # Fused attention kernels have no forward-mode derivative; the math kernel computes the same attention.
    with forward_ad.dual_level(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # PyTorch's own lazily loaded forward-AD decompositions still call the deprecated torch.jit.script.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        duals = {name: forward_ad.make_dual(value, direction[name]) for name, value in parameters.items()}
        return forward_ad.unpack_dual(_kd_minus_ce(student, duals, buffers, problem)).tangent


@torch.no_grad()
def _central_difference(
    student: nn.Module,
    parameters: dict[str, Tensor],
    buffers: dict[str, Tensor],
    problem: BilevelProblem,
    direction: dict[str, Tensor],
    fd_epsilon: float,
) -> Tensor:
    """(D_i(theta + eps v) - D_i(theta - eps v)) / 2 eps with eps = fd_epsilon / |v| (DARTS)."""
    norm = torch.sqrt(sum(grad.pow(2).sum() for grad in direction.values()))
    if norm == 0:
        return torch.zeros_like(problem.targets, dtype=torch.float32)
    epsilon = fd_epsilon / norm
    above, below = (
        _kd_minus_ce(student, {name: value + sign * epsilon * direction[name] for name, value in parameters.items()}, buffers, problem)
        for sign in (1, -1)
    )
    return (above - below) / (2 * epsilon)


def _grads_or_zeros(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(value) if grad is None else grad for value, grad in zip(inputs, grads)]


# -- the method -----------------------------------------------------------------------------------


class _EpochRecord(nn.Module):
    """What this epoch's steps saw, in fixed-shape buffers: a mid-epoch resume state holds it whole."""

    def __init__(self, num_train: int, num_classes: int, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.zeros(num_train, device=device))
        self.register_buffer("seen", torch.zeros(num_train, dtype=torch.bool, device=device))  # trained on this epoch (by this rank)
        self.register_buffer("teacher_right", torch.zeros(num_train, dtype=torch.bool, device=device))
        self.register_buffer("meta_loss_sum", torch.zeros((), device=device))
        self.register_buffer("class_sums", torch.zeros(num_classes, num_classes, device=device))  # teacher probabilities per label
        self.register_buffer("class_counts", torch.zeros(num_classes, device=device))
        self.meta_updates = 0  # also how many validation batches this epoch has drawn

    def get_extra_state(self) -> dict[str, Any]:
        return {"meta_updates": self.meta_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.meta_updates = int(state["meta_updates"])


class AdaptiveFusion(Method):
    """Per-sample KD/CE fusion ratio: TGeo-KD's bilevel-learned MLP, ADA-KD, WLS-KD or fixed."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "TGeo-KD: per-sample teacher/label fusion ratio learned by bilevel optimization (or ADA, WLS, fixed)."
    Params = AdaptiveFusionParams
    backpropagates_twice = True  # the virtual step differentiates the real step's forward pass

    def __init__(self, params: AdaptiveFusionParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        self.params: AdaptiveFusionParams = params
        self.fusion: FusionNetwork | None = None
        self.fusion_optimizer: torch.optim.Optimizer | None = None
        if params.ratio == "learned":
            if not context.has_val:
                raise MethodError(
                    "adaptive-fusion with ratio=learned trains its fusion network on a held-out validation split: "
                    "set --val-split above 0 (or use method.ratio=fixed|ada|wls)"
                )
            self.fusion = FusionNetwork(context.num_classes, params.hidden, params.alpha).to(context.device)
            self.fusion_optimizer = _fusion_optimizer(self.fusion, params)
        self.register_buffer("class_means", None)  # T̄, [C, C]: computed when the first epoch starts (learned ratio only)
        self.register_buffer("alpha_by_sample", torch.full((context.num_train,), math.nan, device=context.device))
        self.steps = 0
        self.epoch_record = self._empty_record()
        self.val_batches: Iterator[Batch] = iter(())
        self.val_batches_to_skip = 0

    # -- hooks --------------------------------------------------------------------------------------

    def _empty_record(self) -> _EpochRecord:
        return _EpochRecord(self.context.num_train, self.context.num_classes, self.context.device)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch_record = self._empty_record()
        if self.fusion is None:
            return
        if self.class_means is None:
            self.class_means = self._class_means_from_training_split()
        # The engine seeds torch per (run seed, epoch, rank) before this hook: a resumed run replays it.
        self.val_batches = self._endless_val_batches(torch.initial_seed())

    def training_step(self, batch: Batch) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        self.steps += 1
        logits = self.student_logits(batch.inputs)
        if self.fusion is not None and (self.steps - 1) % self.params.meta_every == 0:
            self._update_fusion(batch, teacher_logits, logits)  # the virtual step reuses this forward pass
        alpha = self._ratio(logits, teacher_logits, batch.targets)
        kd, ce = per_sample_terms(logits, teacher_logits, batch.targets, self.params.temperature, self.params.kl_reduction)
        self._record(batch, alpha, teacher_logits)
        return StepOutput(logits, {"kd": (alpha * kd).mean(), "ce": ((1 - alpha) * ce).mean()})

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        record, self.epoch_record = self.epoch_record, self._empty_record()
        gather = self.context.all_gather
        seen_by = gather(record.seen[None])  # [ranks, N]: each rank filled the samples it trained on
        seen = seen_by.any(dim=0)
        if not seen.any():
            return {}
        alpha = gather(record.alpha[None]).sum(dim=0)[seen] / seen_by.sum(dim=0)[seen]
        right = (gather(record.teacher_right[None]) & seen_by).any(dim=0)[seen]
        self.alpha_by_sample[seen] = alpha
        numbers = alpha_summary(alpha, right)
        meta = gather(torch.stack([record.meta_loss_sum, torch.tensor(float(record.meta_updates), device=record.alpha.device)])[None]).sum(dim=0)
        if meta[1] > 0:
            numbers["meta_val_ce"] = (meta[0] / meta[1]).item()
        if self.fusion is not None and self.params.class_means == "epoch":
            sums, counts = (gather(part[None]).sum(dim=0) for part in (record.class_sums, record.class_counts))
            self.class_means = class_means_from_sums(sums, counts)
        return numbers

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps}
        if self.fusion_optimizer is not None:
            state["fusion_optimizer"] = self.fusion_optimizer.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.fusion_optimizer is not None:
            self.fusion_optimizer.load_state_dict(state["fusion_optimizer"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if self.fusion is not None and self.class_means is None and "class_means" in state_dict:
            # Computed when the first epoch starts; a state saved after that brings its own.
            self.class_means = torch.empty_like(state_dict["class_means"], device=self.context.device)
        result = super().load_state_dict(state_dict, strict, assign)
        # Resumed inside an epoch: the seeded validation stream restarts, so skip what was already used.
        self.val_batches_to_skip = self.epoch_record.meta_updates
        return result

    # -- pieces -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _ratio(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        ratio = self.params.ratio
        if ratio == "learned":
            assert self.fusion is not None and self.class_means is not None
            return self.fusion(trilateral_geometry(student_logits, teacher_logits, targets, self.class_means))
        if ratio == "ada":
            return ada_ratio(teacher_logits, targets)
        if ratio == "wls":
            return wls_ratio(student_logits, teacher_logits, targets)
        return torch.full_like(targets, self.params.alpha, dtype=torch.float32)

    def _update_fusion(self, batch: Batch, teacher_logits: Tensor, logits: Tensor) -> None:
        assert self.fusion is not None and self.fusion_optimizer is not None and self.class_means is not None
        for _ in range(self.val_batches_to_skip):
            next(self.val_batches)
        self.val_batches_to_skip = 0
        val = next(self.val_batches)
        problem = BilevelProblem(
            inputs=batch.inputs,
            targets=batch.targets,
            teacher_logits=teacher_logits,
            class_means=self.class_means,
            val_inputs=val.inputs,
            val_targets=val.targets,
            temperature=self.params.temperature,
            kl_reduction=self.params.kl_reduction,
            virtual_lr=self.params.virtual_lr,
        )
        loss, grads = hypergradient(
            self.student,
            self.fusion,
            problem,
            first_order=self.params.first_order,
            fd_epsilon=self.params.fd_epsilon,
            training_logits=logits,
        )
        grads = self._averaged_over_ranks(grads)
        for parameter, grad in zip(self.fusion.parameters(), grads):
            parameter.grad = grad
        self.fusion_optimizer.step()
        self.fusion_optimizer.zero_grad(set_to_none=True)
        self.epoch_record.meta_loss_sum += loss.detach()
        self.epoch_record.meta_updates += 1

    def _averaged_over_ranks(self, grads: list[Tensor]) -> list[Tensor]:
        if self.context.world_size == 1:
            return grads
        flat = self.context.all_gather(torch.cat([grad.flatten() for grad in grads])[None]).mean(dim=0)
        return [part.view_as(grad) for part, grad in zip(flat.split([grad.numel() for grad in grads]), grads)]

    def _record(self, batch: Batch, alpha: Tensor, teacher_logits: Tensor) -> None:
        record = self.epoch_record
        record.alpha[batch.index] = alpha.detach().float()
        record.seen[batch.index] = True
        record.teacher_right[batch.index] = teacher_logits.argmax(dim=1).eq(batch.targets)
        record.class_sums.index_add_(0, batch.targets, F.softmax(teacher_logits.float(), dim=1))
        record.class_counts += torch.bincount(batch.targets, minlength=self.context.num_classes)

    @torch.no_grad()
    def _class_means_from_training_split(self) -> Tensor:
        """T̄ from the training split and its labels only (every rank sees the whole split)."""
        classes = self.context.num_classes
        sums = torch.zeros(classes, classes, device=self.context.device)
        counts = torch.zeros(classes, device=self.context.device)
        for batch in self.context.batches("train"):
            sums.index_add_(0, batch.targets, F.softmax(self.teacher_logits(batch).float(), dim=1))
            counts += torch.bincount(batch.targets, minlength=classes)
        return class_means_from_sums(sums, counts)

    def _endless_val_batches(self, seed: int) -> Iterator[Batch]:
        for round_ in itertools.count():
            batches = self.context.batches("val", shuffle=True, batch_size=self.params.val_batch_size, seed=seed + round_)
            first = next(batches, None)
            if first is None:  # the loader drops a lone sample: batch norm cannot train on it
                raise MethodError("adaptive-fusion needs a validation split of at least 2 samples: raise --val-split")
            yield first
            yield from batches


def class_means_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """Row c: the mean teacher probability vector of class c; uniform for a class never seen."""
    uniform = torch.full_like(sums, 1.0 / sums.shape[1])
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], uniform)


def alpha_summary(alpha: Tensor, teacher_right: Tensor) -> dict[str, float]:
    """alpha's mean and quartiles, and its mean where the teacher gets the training label right vs wrong."""
    quartiles = torch.quantile(alpha, torch.tensor([0.25, 0.5, 0.75], device=alpha.device)).tolist()
    numbers = {
        "alpha_mean": alpha.mean().item(),
        "alpha_q25": quartiles[0],
        "alpha_median": quartiles[1],
        "alpha_q75": quartiles[2],
        "teacher_wrong_frac": (~teacher_right).float().mean().item(),
    }
    if teacher_right.any():
        numbers["alpha_teacher_right"] = alpha[teacher_right].mean().item()
    if not teacher_right.all():
        numbers["alpha_teacher_wrong"] = alpha[~teacher_right].mean().item()
    return numbers


def _fusion_optimizer(fusion: FusionNetwork, params: AdaptiveFusionParams) -> torch.optim.Optimizer:
    if params.meta_optimizer == "sgd":
        return torch.optim.SGD(fusion.parameters(), lr=params.meta_lr, momentum=0.9)
    return torch.optim.Adam(fusion.parameters(), lr=params.meta_lr)
