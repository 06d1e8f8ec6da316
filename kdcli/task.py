"""The trainable part of a run as one module: the student and a method's trainable submodules.

Its forward is the student's plain forward (logits, or logits and stage
features), so DDP and ``torch.compile`` wrap exactly what is trained (timm's
``FeatureDistillationTrainableModule``): the teacher, the losses and the
method's bookkeeping run outside it, eagerly, and no forward steps an optimizer.
A method's connectors are used on the forward's outputs, outside it; DDP still
reduces their gradients, which the backward produces.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdcli.method import Method, run_student


class TrainableModule(nn.Module):
    """``student`` first, then ``extras``: the optimizer's parameter order, which resume states record."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.student = method.student
        self.extras = nn.ModuleDict(method.trainable_modules())

    def forward(self, inputs: Tensor, indices: tuple[int, ...] = (), names: tuple[str, ...] = ()) -> Any:
        return run_student(self.student, inputs, indices, names)
