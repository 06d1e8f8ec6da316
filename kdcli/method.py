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
* raise ``MethodError`` when the run cannot work as configured (a model the
  method cannot handle, a bad combination of settings): the CLI prints it as
  one line, not a traceback.

Plugins import from this module, :mod:`kdcli.losses` and torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdcli.errors import UsageError

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


class Method:
    """Base class of every method; subclass it and implement ``training_step``."""

    api_version: ClassVar[str] = API_VERSION
    roles: ClassVar[frozenset[Role]] = frozenset({"distill"})
    teacher_use: ClassVar[TeacherUse] = "required"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams

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
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher")
        return self.teacher(inputs)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Extra modules optimized together with the student (not deployed)."""
        return {}

    def eval_inputs(self, inputs: Tensor) -> Tensor:
        """What per-epoch validation feeds the student (e.g. a noisy view); default: unchanged."""
        return inputs

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of ``epoch`` (1-based)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Called after the last step of ``epoch``; returned numbers are logged."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state for resuming: nested dicts/lists of tensors and plain values."""
        return {name: module.state_dict() for name, module in self.trainable_modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.trainable_modules().items():
            module.load_state_dict(state[name])
