"""The public plugin API: what a knowledge-distillation method is to kdcli.

A method is one small object (the mdistiller contract): the engine hands it a
batch, it returns the logits it trained on and a dict of named loss terms; the
engine sums the terms, backpropagates, steps the optimizer and logs each term.
The engine knows no method by name.  A method may additionally

* declare hyperparameters as a pydantic model (``Params``), shown by
  ``kdcli methods show`` and set with ``--set method.NAME=VALUE``;
* add trainable modules (connectors, small heads) with ``trainable_modules``:
  the engine optimizes them with the student and saves them in the resume
  state, never in the deployable student checkpoint;
* react to epoch boundaries (``on_epoch_start``/``on_epoch_end``) and report
  extra per-epoch numbers;
* keep state (tensors, numbers) that ``state_dict``/``load_state_dict`` carry
  through the resume state;
* say why it needs, or takes no, teacher network (``teacher_note``), and have
  its student default to the teacher's architecture
  (``student_defaults_to_teacher_arch``, for self-distillation).
* read intermediate features by stage index (``logits_and_features``,
  ``stage_features``, ``feature_shapes``: timm's ``forward_intermediates``);
* corrupt inputs with ``PixelNoise`` (the noise ``kdcli eval --noise-std`` uses);
* raise ``UsageError`` for a setting that does not fit the run (one line, no traceback).
* raise ``MethodError`` when the run cannot work as configured (a model the
  method cannot handle, a bad combination of settings): the CLI prints it as
  one line, not a traceback.

Plugins import from this module, :mod:`kdcli.losses`, torch and pydantic only.
The contract, with a complete example, is documented in ``docs/plugins.md``;
``API_VERSION`` (MAJOR.MINOR) versions it: a plugin declares the version it
was written against in ``Method.api_version`` and loads when the major
versions agree and its minor version is not newer than kdcli's.

With ``kdcli distill --cache-teacher`` the ``teacher`` a method receives is a
stand-in that answers calls on the current ``batch.inputs`` from a table of
the teacher's logits (other inputs run the real teacher); anything beyond
calling it (``forward_intermediates``, its layers, ``train()``) raises an error
telling the user to drop ``--cache-teacher``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from timm.utils import unwrap_model
from torch import Tensor, nn

from kdcli.data.noise import PixelNoise
from kdcli.errors import UsageError

__all__ = [
    "API_VERSION",
    "Batch",
    "BatchSource",
    "Method",
    "MethodContext",
    "MethodError",
    "MethodParams",
    "PixelNoise",
    "Role",
    "StepOutput",
    "TeacherUse",
    "UsageError",
    "feature_shapes",
    "logits_and_features",
    "stage_features",
]

API_VERSION = "1.0"

TeacherUse = Literal["required", "none", "optional"]
Role = Literal["teach", "distill"]


class MethodError(UsageError):
    """A method cannot run as configured; shown to the user as one line (exit code 2)."""


class MethodParams(BaseModel):
    """Base for a method's hyperparameters: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Batch:
    """One training batch, already augmented and normalized on the device."""

    inputs: Tensor
    targets: Tensor
    index: Tensor  # position of each sample in the training split (for per-sample state)


@dataclass
class StepOutput:
    """What a training step returns: logits, loss terms to sum, and numbers to log."""

    logits: Tensor
    losses: dict[str, Tensor]
    logs: dict[str, Tensor | float] = field(default_factory=dict)


class BatchSource(Protocol):
    """Iterate a whole split (every rank sees all of it), e.g. for class means or a held-out loss."""

    def __call__(
        self,
        split: Literal["train", "val"],
        *,
        shuffle: bool = False,
        augment: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> Iterator[Batch]: ...


def _no_batches(split: str, **options: Any) -> Iterator[Batch]:
    raise RuntimeError("this MethodContext was built without data access")


@dataclass(frozen=True)
class MethodContext:
    """Facts about the run a method may need; built by the engine's caller."""

    num_classes: int
    num_train: int  # samples in the training split (size of per-sample banks)
    epochs: int
    steps_per_epoch: int
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    world_size: int = 1
    all_gather: Callable[[Tensor], Tensor] = lambda tensor: tensor  # concatenates along dim 0 across ranks
    batches: BatchSource = _no_batches  # "val" exists only when the run holds out a validation split
    has_val: bool = False
    input_size: tuple[int, int, int] | None = None  # (C, H, W) of the inputs; None when unknown


class Method:
    """Base class of every method; subclass it and implement ``training_step``."""

    api_version: ClassVar[str] = API_VERSION  # third-party plugins pin the version they were written for
    roles: ClassVar[frozenset[Role]] = frozenset({"distill"})
    teacher_use: ClassVar[TeacherUse] = "required"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Why the method needs, or takes no, teacher network: added to the error when --teacher is misused.
    teacher_note: ClassVar[str] = ""
    # Without --model the student gets the teacher checkpoint's architecture (self-distillation),
    # instead of the job's default model.
    student_defaults_to_teacher_arch: ClassVar[bool] = False

    def __init__(
        self,
        params: MethodParams,
        *,
        student: nn.Module,
        teacher: nn.Module | None,
        context: MethodContext,
    ) -> None:
        self.params = params
        self.student = student
        self.teacher = teacher
        self.context = context

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """Frozen teacher forward: eval mode, no graph."""
        return self._frozen_teacher()(inputs)

    @torch.no_grad()
    def teacher_features(self, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """The frozen teacher's features at stage ``indices``: no graph, stops after the deepest."""
        return stage_features(self._frozen_teacher(), inputs, indices)

    def student_logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """The student's logits and features at stage ``indices``, through the engine's wrappers."""
        return logits_and_features(self.student, inputs, indices)

    def _frozen_teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher")
        return self.teacher

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Extra modules optimized together with the student (not deployed)."""
        return {}

    def eval_inputs(self, inputs: Tensor) -> Tensor:
        """What per-epoch validation feeds the student (e.g. a noisy view); default: unchanged."""
        return inputs

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of ``epoch`` (1-based).

        A run resumed inside an epoch calls it again, then loads the saved
        ``state_dict``: keep in that state whatever this computes from the
        training so far.
        """

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Called after the last step of ``epoch``; returned numbers are logged."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state for resuming: nested dicts/lists of tensors and plain values.

        A tensor present right after construction must keep its dtype and
        shape (preallocate banks): resume states are checked against them.
        """
        return {name: module.state_dict() for name, module in self.trainable_modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.trainable_modules().items():
            module.load_state_dict(state[name])


# -- intermediate features ----------------------------------------------------------


def _feature_model(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    if not callable(getattr(inner, "forward_intermediates", None)):
        raise UsageError(f"model {type(inner).__name__} has no forward_intermediates: its features cannot be selected by stage index")
    return inner


def logits_and_features(model: nn.Module, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Logits and the features at stage ``indices`` (timm ``forward_intermediates``) in one forward.

    Features come in ascending stage order, whatever the order of ``indices``.
    ``model`` may be the engine's wrapper of the student (DDP, ``torch.compile``).
    Calling ``forward_intermediates`` on the unwrapped network would bypass
    DDP, whose gradient all-reduce only fires after its own forward ran; so the
    unwrapped network's ``forward`` is swapped for this one call and the call
    goes through every wrapper.
    """
    inner = _feature_model(model)

    def forward(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        final, features = inner.forward_intermediates(images, indices=list(indices))
        return inner.forward_head(final), features

    if model is inner:
        return forward(inputs)
    inner.forward = forward  # an instance attribute shadows the class's forward
    try:
        return model(inputs)
    finally:
        del inner.forward


def stage_features(model: nn.Module, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
    """Only the features at stage ``indices`` (ascending stage order), stopping after the deepest.

    For frozen models: no wrapper has to see the call.
    """
    inner = _feature_model(model)
    return inner.forward_intermediates(inputs, indices=list(indices), intermediates_only=True, stop_early=True)


@torch.no_grad()
def feature_shapes(model: nn.Module, input_size: tuple[int, int, int]) -> list[torch.Size]:
    """Per-sample shape of every stage's feature (index 0 first) for inputs of ``input_size``, from a dry run.

    The length of the list is the number of stage indices the model has.  Runs
    in eval mode, so batch-norm statistics stay untouched, and restores the mode.
    """
    inner = _feature_model(model)
    parameter = next(inner.parameters())
    probe = torch.zeros(2, *input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = inner.training
    inner.eval()
    try:
        features = inner.forward_intermediates(probe, intermediates_only=True)
    finally:
        inner.train(was_training)
    return [feature.shape[1:] for feature in features]
