"""``feature-mimic``: Hong, Mao, Lin and Chan (CVPR 2021), "Student-Teacher Learning from Clean Inputs to Noisy Inputs".

The frozen teacher sees the clean (augmented) input x, the student the same
tensor with noise added, x̃ = x + σ·ε on the [0, 1] pixel scale (or
Poisson–Gaussian), and matches its intermediate features to the teacher's:

    L = CE(f_S(x̃), y) + Σ_l λ_l · mean((r_l(h_S^l(x̃)) − h_T^l(x))²)  [+ w_kd · τ²·KL(p_T^τ(x) ‖ p_S^τ(x̃))]

Features are selected by stage index (timm's ``forward_intermediates``; 0 =
stem).  r_l is a learnable 1×1 conv (linear for flat features) from student
to teacher channels, identity where they agree; spatial sizes are aligned by
average-pooling the larger map.  Connectors train with the student and stay
out of the deployable checkpoint.  Validation (model selection) sees a fixed
noisy copy of the validation split.  λ = 0 is the noisy-input baseline (no
teacher forward); ``kd_weight`` adds logit KD from the clean teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator
from torch import Tensor, nn

from kdcli.losses import distillation_kl
from kdcli.method import Batch, Method, MethodContext, MethodParams, StepOutput, Teacher, UsageError, feature_shapes
from kdcli.noise import PixelNoise

VALIDATION_NOISE_SEED = 0  # the noisy validation copy is the same every epoch


class FeatureMimicParams(MethodParams):
    layers: list[int] = Field(
        [1, 2, 3], min_length=1,
        description="Student stage indices whose features mimic the teacher's (forward_intermediates: 0 = stem, -1 = last).",
    )
    teacher_layers: list[int] | None = Field(None, description="Teacher stage index for each student layer; None = the same indices.")
    feature_weight: NonNegativeFloat | list[NonNegativeFloat] = Field(
        1.0, description="lambda: weight of each layer's mean squared feature error (one value or one per layer); 0 = the baseline."
    )
    noise_std: NonNegativeFloat | tuple[NonNegativeFloat, NonNegativeFloat] = Field(
        0.1, description="Gaussian sigma on the 0..1 pixel scale, or a pair (low, high) to draw sigma per sample; the read noise with photons."
    )
    photons: PositiveFloat | None = Field(
        None, description="Poisson-Gaussian noise: expected photons at pixel value 1 (fewer = noisier); None = Gaussian only."
    )
    ce_weight: NonNegativeFloat = Field(1.0, description="Weight of the cross-entropy of the student on noisy inputs.")
    kd_weight: NonNegativeFloat = Field(0.0, description="Weight of the tau^2-scaled KL to the clean teacher's logits (0 = off).")
    temperature: PositiveFloat = Field(4.0, description="Softmax temperature of the optional KD term.")

    @model_validator(mode="after")
    def _layers_fit_together(self) -> FeatureMimicParams:
        for name, values in (("teacher_layers", self.teacher_layers), ("feature_weight", self.feature_weight)):
            if isinstance(values, list) and len(values) != len(self.layers):
                raise ValueError(f"{name} needs one entry per layer ({len(self.layers)}), got {len(values)}")
        if isinstance(self.noise_std, tuple) and self.noise_std[0] > self.noise_std[1]:
            raise ValueError(f"noise_std range must be [low, high] with low <= high, got {list(self.noise_std)}")
        return self

    def layer_weights(self) -> list[float]:
        weights = self.feature_weight
        return list(weights) if isinstance(weights, list) else [weights] * len(self.layers)


class Connector(nn.Module):
    """Aligns a student feature with the teacher's: pool both to the smaller map, project student channels."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (1, 3):
            raise UsageError(
                f"feature-mimic matches NCHW or flat features of equal rank; got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)} per sample"
            )
        student_channels, teacher_channels = student_shape[0], teacher_shape[0]
        spatial = len(student_shape) == 3
        self.size = tuple(min(s, t) for s, t in zip(student_shape[1:], teacher_shape[1:])) if spatial else None
        if student_channels == teacher_channels:
            self.project: nn.Module = nn.Identity()
        elif spatial:
            self.project = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.project = nn.Linear(student_channels, teacher_channels)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        if self.size is not None:
            # Pool before projecting: a 1x1 conv commutes with average pooling and is cheaper on the smaller map.
            student, teacher = (self._pool(feature) for feature in (student, teacher))
        return self.project(student), teacher

    def _pool(self, feature: Tensor) -> Tensor:
        size = tuple(feature.shape[2:])
        if size == self.size:
            return feature
        if all(have % want == 0 for have, want in zip(size, self.size)):
            # The same average as adaptive pooling when the sizes divide, but its CUDA backward is
            # deterministic: adaptive pooling's raises under train.deterministic.
            return F.avg_pool2d(feature, tuple(have // want for have, want in zip(size, self.size)))
        return F.adaptive_avg_pool2d(feature, self.size)


class FeatureMimic(Method):
    """Student on noisy inputs mimics the clean-input teacher's hidden features."""

    roles = frozenset({"distill"})
    teacher_use = "required"
    summary = "Hong et al. 2021: noisy-input student mimics the clean teacher's stage features (+CE); noisy-val selection."
    Params = FeatureMimicParams
    accepts_soft_targets = True  # its only use of the targets is F.cross_entropy

    def __init__(self, params: FeatureMimicParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__(params, student=student, teacher=teacher, context=context)
        self.noise = PixelNoise(sigma=params.noise_std, photons=params.photons)
        self.validation_noise = torch.Generator(context.device)
        pairs = [
            (student_index, teacher_index, weight)
            for student_index, teacher_index, weight in zip(params.layers, params.teacher_layers or params.layers, params.layer_weights())
            if weight > 0  # lambda = 0 drops the layer; all zero = the baseline, no teacher features
        ]
        self.student_indices, self.teacher_indices, self.weights, self.connectors = self._build_connectors(pairs)

    def _build_connectors(self, pairs: list[tuple[int, int, float]]) -> tuple[list[int], list[int], list[float], nn.ModuleList]:
        if not pairs:
            return [], [], [], nn.ModuleList()
        if self.context.input_size is None:
            raise RuntimeError("feature-mimic needs MethodContext.input_size to size its connectors")
        student_shapes = feature_shapes(self.student, self.context.input_size)
        teacher_shapes = self._source().feature_shapes(self.context.input_size)
        student_indices = resolve_indices([s for s, _, _ in pairs], len(student_shapes), "method.layers", "student")
        teacher_indices = resolve_indices([t for _, t, _ in pairs], len(teacher_shapes), "method.teacher_layers", "teacher")
        connectors = nn.ModuleList(
            Connector(student_shapes[s], teacher_shapes[t]) for s, t in zip(student_indices, teacher_indices)
        )
        return student_indices, teacher_indices, [weight for _, _, weight in pairs], connectors

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"connectors": self.connectors}

    def training_step(self, batch: Batch) -> StepOutput:
        context, params = self.context, self.params
        noisy = self.noise(batch.inputs, context.mean, context.std)  # global RNG: the engine seeds it per epoch
        if self.student_indices:
            logits, student_features = self.student_logits_and_features(noisy, sorted(self.student_indices))
        else:
            logits, student_features = self.student_logits(noisy), []
        losses = {"ce": params.ce_weight * F.cross_entropy(logits, batch.targets)}
        teacher_logits, teacher_features = self._teacher_outputs(batch)
        by_student = dict(zip(sorted(self.student_indices), student_features))
        by_teacher = dict(zip(sorted(self.teacher_indices), teacher_features))
        for student_index, teacher_index, weight, connector in zip(self.student_indices, self.teacher_indices, self.weights, self.connectors):
            student, teacher = connector(by_student[student_index], by_teacher[teacher_index])
            losses[f"mimic{student_index}"] = weight * F.mse_loss(student.float(), teacher.float())
        if teacher_logits is not None:
            losses["kd"] = params.kd_weight * distillation_kl(logits, teacher_logits, params.temperature)
        return StepOutput(logits, losses)

    def _teacher_outputs(self, batch: Batch) -> tuple[Tensor | None, list[Tensor]]:
        """The clean-input teacher's logits (only when KD is on) and features, from one forward."""
        indices = sorted(self.teacher_indices)
        if self.params.kd_weight == 0:
            return None, self.teacher_features(batch.inputs, indices) if indices else []
        if not indices:
            return self.teacher_logits(batch), []
        return self.teacher_logits_and_features(batch.inputs, indices)

    def on_epoch_start(self, epoch: int) -> None:
        # Validation runs after this epoch's steps and draws only from this generator.
        self.validation_noise.manual_seed(VALIDATION_NOISE_SEED)

    def eval_inputs(self, inputs: Tensor) -> Tensor:
        """Model selection on noisy validation inputs, the same noisy copy every epoch."""
        return self.noise(inputs, self.context.mean, self.context.std, self.validation_noise)


def resolve_indices(indices: list[int], count: int, key: str, role: str) -> list[int]:
    """Negative stage indices count from the end; each index once; all within the model's stages."""
    resolved = [index + count if index < 0 else index for index in indices]
    if any(not 0 <= index < count for index in resolved):
        raise UsageError(f"{key}: the {role} has stage indices 0..{count - 1} (or -{count}..-1), got {indices}")
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"{key}: each stage index may appear once, got {indices}")
    return resolved
