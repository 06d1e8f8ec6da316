"""The trainable part of a run as one module: the student and a method's extra modules.

Its forward is the method's training step, so DDP and ``torch.compile`` wrap
it once (mdistiller's distiller, timm's ``FeatureDistillationTrainableModule``):
every parameter it optimizes is used inside that forward, and the method
always sees the plain student.
"""

from __future__ import annotations

from torch import nn

from kdcli.method import Method
from kdcli.step import Batch, StepOutput


class TrainableTask(nn.Module):
    """``student`` first, then ``extras``: the optimizer's parameter order, which resume states record."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.student = method.student
        self.extras = nn.ModuleDict(method.trainable_modules())
        object.__setattr__(self, "method", method)  # not a submodule: the method is not a module

    def forward(self, batch: Batch) -> StepOutput:
        return self.method.training_step(batch)
