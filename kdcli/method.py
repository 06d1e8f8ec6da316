"""The public plugin API (version 3): what a knowledge-distillation method is to kdcli.

A method is one small ``nn.Module`` (the mdistiller contract): the engine hands
it a ``Batch``, it returns the logits it trained on and a dict of named loss
terms (``StepOutput``); the engine sums the terms, backpropagates, steps the
optimizer, calls ``after_step`` and logs each term.  The engine knows no
method by name.

Being a module, a method keeps its state the way any PyTorch module does:
connectors and heads are submodules, per-sample banks are registered buffers,
counters that are not tensors go through ``get_extra_state``.  ``.to()``,
``state_dict()`` (the resume state) and ``load_state_dict`` take them with no
hand code.  The student and the teacher are not submodules of the method:
the student's weights are saved on their own, and the frozen teacher never
joins the optimizer, DDP or the resume state.

The student runs through ``self.student_logits(inputs)`` or
``self.student_logits_and_features(inputs, indices)``: the one trainable
module (the student and ``trainable_modules``), wrapped once with DDP and
``torch.compile``.  Only that forward is compiled; the rest of
``training_step`` (the teacher under ``torch.inference_mode``, the losses,
bookkeeping) runs eagerly, so per-epoch numbers may be plain Python values.
``self.student`` is the plain network, for looking at (feature shapes,
layers, ``torch.func.functional_call``), never for the training forward.

The teacher is a source asked per batch: ``self.teacher_logits(batch)`` gives
the frozen teacher's logits on ``batch.inputs`` (from a table of cached
logits with ``train.cache_teacher``), ``self.teacher_logits_and_features`` and
``self.teacher_features`` its stage features on any inputs.

A method may additionally

* declare hyperparameters as a pydantic model (``Params``), shown by
  ``kdcli methods show`` and set in the config's ``method`` section;
* name the submodules optimized with the student (``trainable_modules``:
  connectors, small heads): trained and saved in the resume state, never in
  the deployable student checkpoint;
* update state after the optimizer step (``after_step``: banks, records);
* react to epoch boundaries (``on_epoch_start``/``on_epoch_end``) and report
  extra per-epoch numbers;
* choose what validation feeds the student (``eval_inputs``);
* choose the student's architecture when the user names none (``default_model``);
* raise ``MethodError`` when the run cannot work as configured: the CLI
  prints it as one line, not a traceback.

Plugins import from this module, :mod:`kdcli.losses`, :mod:`kdcli.noise`,
torch and pydantic only.  The contract, with complete examples, is documented
in ``docs/plugins.md``; ``API_VERSION`` (MAJOR.MINOR) versions it: a plugin
declares the version it was written against in ``Method.api_version`` and
loads when the major versions agree and its minor version is not newer than
kdcli's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdcli.defaults import API_VERSION
from kdcli.errors import UsageError
from kdcli.features import feature_shapes, logits_and_features, module_features, named_modules, stage_features, tap_modules
from kdcli.step import Batch, StepOutput
from kdcli.teacher import FrozenTeacher

__all__ = [
    "API_VERSION",
    "Batch",
    "BatchSource",
    "FrozenTeacher",
    "Method",
    "MethodContext",
    "MethodError",
    "MethodParams",
    "Role",
    "StudentForward",
    "StepOutput",
    "Teacher",
    "TeacherUse",
    "UsageError",
    "feature_shapes",
    "logits_and_features",
    "module_features",
    "named_modules",
    "run_student",
    "stage_features",
    "tap_modules",
]


TeacherUse = Literal["required", "none", "optional"]
Role = Literal["teach", "distill"]


class MethodError(UsageError):
    """A method cannot run as configured; shown to the user as one line (exit code 2)."""


class MethodParams(BaseModel):
    """Base for a method's hyperparameters: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Teacher(Protocol):
    """The frozen teacher, asked per batch (``kdcli.teacher.FrozenTeacher`` or the logit cache)."""

    def logits(self, batch: Batch) -> Tensor: ...

    def logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]: ...

    def features(self, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]: ...

    def module_features(self, inputs: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]: ...

    def feature_shapes(self, input_size: tuple[int, int, int]) -> list[torch.Size]: ...


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
    """Facts about the run a method may need; built by the run before the method."""

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


StudentForward = Callable[..., Any]  # (inputs) -> logits; (inputs, indices) -> (logits, features)


def run_student(student: nn.Module, inputs: Tensor, indices: tuple[int, ...] = (), names: tuple[str, ...] = ()) -> Any:
    """The student's logits, or its logits and the features at stage ``indices`` or of the modules ``names``."""
    if names:
        return module_features(student, inputs, names)
    if indices:
        return logits_and_features(student, inputs, indices)
    return student(inputs)


class Method(nn.Module):
    """Base class of every method; subclass it and implement ``training_step``."""

    api_version: ClassVar[str] = API_VERSION  # third-party plugins pin the version they were written for
    roles: ClassVar[frozenset[Role]] = frozenset({"distill"})
    teacher_use: ClassVar[TeacherUse] = "required"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Why the method needs, or takes no, teacher network: added to the error when a teacher is misused.
    teacher_note: ClassVar[str] = ""
    # True when every use of ``batch.targets`` also works with class probabilities [B, C] (``F.cross_entropy``
    # takes both): only then may a run mix its batches (Mixup/CutMix), which turns labels into probabilities.
    accepts_soft_targets: ClassVar[bool] = False
    # True when ``training_step`` backpropagates through the student's forward before the engine does
    # (``retain_graph=True``): a compiled forward then keeps the tensors its backward would free.
    backpropagates_twice: ClassVar[bool] = False

    def __init__(self, params: MethodParams, *, student: nn.Module, teacher: Teacher | None, context: MethodContext) -> None:
        super().__init__()
        self.params = params
        self.context = context
        # Not submodules: the student's weights are saved on their own, the frozen teacher is no part of the method's state.
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "_student_forward", partial(run_student, student))

    def use_student_forward(self, forward: StudentForward) -> None:
        """The engine's wrapped trainable module (DDP, ``torch.compile``) replaces the plain student call."""
        object.__setattr__(self, "_student_forward", forward)

    @classmethod
    def default_model(cls, *, teacher_arch: str | None) -> str | None:
        """The student's architecture when the user names none; None = the job's default model."""
        return None

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    # -- the student, the teacher and features -------------------------------------------

    def student_logits(self, inputs: Tensor) -> Tensor:
        """The student's logits on ``inputs``, through the trainable (wrapped, maybe compiled) forward."""
        return self._student_forward(inputs)

    def student_logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """The student's logits and features at stage ``indices`` (ascending stage order), in one forward."""
        return self._student_forward(inputs, tuple(indices))

    def student_logits_and_module_features(self, inputs: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """The student's logits and the outputs of its modules called ``names`` (in that order), in one forward."""
        tap_modules(self.student, names)  # the hooks exist before the (compiled) forward runs
        return self._student_forward(inputs, names=tuple(names))

    def teacher_logits(self, batch: Batch) -> Tensor:
        """The frozen teacher's logits on ``batch.inputs`` (no graph)."""
        return self._source().logits(batch)

    def teacher_logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """The frozen teacher's logits and features at stage ``indices`` on ``inputs`` (no graph)."""
        return self._source().logits_and_features(inputs, indices)

    def teacher_features(self, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Only the frozen teacher's features at stage ``indices`` (no graph; stops after the deepest)."""
        return self._source().features(inputs, indices)

    def teacher_module_features(self, inputs: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """The frozen teacher's logits and the outputs of its modules called ``names`` (no graph)."""
        return self._source().module_features(inputs, names)

    def _source(self) -> Teacher:
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher")
        return self.teacher

    # -- optional hooks ------------------------------------------------------------------

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Submodules optimized together with the student (not deployed); asked once, after construction."""
        return {}

    def after_step(self, batch: Batch, output: StepOutput) -> None:
        """Called after the optimizer step of every step that was taken (not for a skipped one): update banks here."""

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
