"""What the RepDistiller-style methods (``at``, ``sp``, ``pkt``, ``rkd``) share.

RepDistiller's ``train_student.py`` combines every method the same way,

    L = r * CE(z_s, y) + a * KD(z_s, z_t) + b * L_method,

with ``-r 1 -a 0`` and a per-method ``-b`` in its benchmark script
(``scripts/run_cifar_distill.sh``); KD is ``DistillKL`` (tau 4, tau^2-scaled,
batch-mean KL).  Features are those of ``model(x, is_feat=True)``: the stem and
stage outputs (kdcli's stage indices 0..n, post-activation as RepDistiller's
``preact=False``) and the pooled vector before the classifier (here: the
output of a named module, ``global_pool`` in the CIFAR zoo and most timm
models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from kdcli.losses import distillation_kl
from kdcli.method import Method, MethodContext, MethodError, MethodParams, Teacher, feature_shapes, named_modules

# The module whose output is the pooled feature before the classifier (RepDistiller's feat[-1]).
POOLED_MODULE = "global_pool"


class RepDistillerParams(MethodParams):
    ce_weight: NonNegativeFloat = Field(1.0, description="Weight of the cross-entropy with the labels (RepDistiller -r).")
    kd_weight: NonNegativeFloat = Field(0.0, description="Weight of the tau^2-scaled KL to the teacher (RepDistiller -a; 0 = off).")
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature of the optional KD term.")


class StageFeatureParams(RepDistillerParams):
    layers: list[int] | None = Field(
        None, min_length=1, description="Student stage indices (0 = stem, -1 = last stage); None = every stage after the stem."
    )
    teacher_layers: list[int] | None = Field(None, min_length=1, description="Teacher stage index per student layer; None = as layers.")


class PooledFeatureParams(RepDistillerParams):
    student_module: str = Field(POOLED_MODULE, description="Student module whose output is its pooled feature (named_modules() name).")
    teacher_module: str | None = Field(None, description="Teacher module whose output is its pooled feature; None = student_module.")


class RepDistillerMethod(Method):
    """CE and the optional KD term, the way RepDistiller adds them to every feature loss."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    accepts_soft_targets = True  # the targets only feed F.cross_entropy
    params: RepDistillerParams

    def full_precision(self) -> torch.autocast:
        """The feature losses in float32 under mixed precision too: autocast would run their matmuls (Gram
        matrices, pairwise distances) in bf16, where |a|^2 + |b|^2 - 2 a.b and the like lose most digits."""
        return torch.autocast(self.context.device.type, enabled=False)

    def ce_and_kd(self, logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        """The weighted CE, and the weighted KD term when ``kd_weight > 0`` (then ``teacher_logits`` are needed)."""
        params = self.params
        losses = {"ce": params.ce_weight * F.cross_entropy(logits, targets)}
        if teacher_logits is not None and params.kd_weight > 0:
            losses["kd"] = params.kd_weight * distillation_kl(logits, teacher_logits, params.temperature)
        return losses


class StageFeatureMethod(RepDistillerMethod):
    """A method on pairs of stage features; ``self.pairs`` holds the (student, teacher) stage indices."""

    params: StageFeatureParams

    def __init__(self, params: StageFeatureParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        self.pairs = stage_pairs(self, params.layers, params.teacher_layers)  # checked before any training

    def paired_stage_features(self, inputs: Tensor) -> tuple[Tensor, Tensor | None, list[tuple[Tensor, Tensor]]]:
        """Student logits, teacher logits (None without KD) and the (student, teacher) feature of each pair, in float32."""
        student_indices, teacher_indices = (sorted(set(indices)) for indices in zip(*self.pairs))
        logits, student_features = self.student_logits_and_features(inputs, student_indices)
        if self.params.kd_weight > 0:
            teacher_logits, teacher_features = self.teacher_logits_and_features(inputs, teacher_indices)
        else:  # the teacher stops after its deepest stage asked for
            teacher_logits, teacher_features = None, self.teacher_features(inputs, teacher_indices)
        by_student = dict(zip(student_indices, student_features))
        by_teacher = dict(zip(teacher_indices, teacher_features))
        return logits, teacher_logits, [(by_student[s].float(), by_teacher[t].float()) for s, t in self.pairs]


class PooledFeatureMethod(RepDistillerMethod):
    """A method on the pooled features before the classifier (RepDistiller's ``feat[-1]``), found by module name."""

    params: PooledFeatureParams

    def __init__(self, params: PooledFeatureParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        self.check_pooled_modules()

    def check_pooled_modules(self) -> None:
        """Refuse a missing module name before training: one line listing the available names (a teacher dry run)."""
        named_modules(self.student, [self.params.student_module])
        if self.context.input_size is not None:
            probe = torch.zeros(2, *self.context.input_size, device=self.context.device)
            with torch.compiler.set_stance("force_eager"):  # a dry run: no graph compiled for its batch size
                self.teacher_module_features(probe, [self.teacher_module])

    @property
    def teacher_module(self) -> str:
        return self.params.teacher_module or self.params.student_module

    def pooled_features(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Student logits, teacher logits, student and teacher pooled features flattened to [B, D], in float32."""
        logits, (student,) = self.student_logits_and_module_features(inputs, [self.params.student_module])
        teacher_logits, (teacher,) = self.teacher_module_features(inputs, [self.teacher_module])
        return logits, teacher_logits, student.flatten(1).float(), teacher.flatten(1).float()


def stage_pairs(method: Method, student_layers: list[int] | None, teacher_layers: list[int] | None) -> list[tuple[int, int]]:
    """(student, teacher) stage indices.

    ``student_layers`` None = every stage after the stem (RepDistiller's
    ``feat[1:-1]``), paired in order as RepDistiller's ``zip`` pairs them: a
    deeper network's extra last stages are left out.  ``teacher_layers`` None =
    the student's indices (or, with both None, every teacher stage after the stem).
    """
    input_size = method.context.input_size
    if input_size is None:
        raise RuntimeError(f"{type(method).__name__} needs MethodContext.input_size to check its stage indices")
    student_count = len(feature_shapes(method.student, input_size))
    teacher_count = len(method.teacher.feature_shapes(input_size))
    if student_layers is None and teacher_layers is None:
        count = min(student_count, teacher_count)
        return [(index, index) for index in range(1, count)]
    student_layers = student_layers or list(range(1, student_count))
    teacher_layers = teacher_layers or student_layers
    if len(student_layers) != len(teacher_layers):
        raise MethodError(f"method.layers and method.teacher_layers need equally many entries, got {student_layers} and {teacher_layers}")
    students = _resolve(student_layers, student_count, "method.layers", "student")
    teachers = _resolve(teacher_layers, teacher_count, "method.teacher_layers", "teacher")
    return list(zip(students, teachers))


def _resolve(indices: list[int], count: int, key: str, role: str) -> list[int]:
    resolved = [index + count if index < 0 else index for index in indices]
    if any(not 0 <= index < count for index in resolved):
        raise MethodError(f"{key}: the {role} has stage indices 0..{count - 1} (or -{count}..-1), got {indices}")
    if len(set(resolved)) != len(resolved):
        raise MethodError(f"{key}: each stage index may appear once, got {indices}")
    return resolved
