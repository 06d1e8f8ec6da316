"""Teacher sources: what a method asks for a batch's teacher logits (or features).

A method never holds the teacher network itself: it asks its source per
batch.  ``FrozenTeacher`` runs a frozen network; ``kdcli.teacher_cache``
serves logits from a table behind the same seam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from kdcli.features import feature_shapes, logits_and_features, module_features, stage_features, tap_modules
from kdcli.step import Batch


Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) on the [0, 1] pixel scale


class Renormalization:
    """Inputs normalized one way, re-expressed in another: ``x * scale + shift`` per channel.

    A teacher expects its own normalization (the mean/std it was trained with,
    stored in its checkpoint), which need not be the data set's.
    """

    def __init__(self, source: Normalization, target: Normalization) -> None:
        (source_mean, source_std), (target_mean, target_std) = source, target
        self.scale = torch.tensor([s / t for s, t in zip(source_std, target_std)]).view(-1, 1, 1)
        self.shift = torch.tensor([(sm - tm) / t for sm, tm, t in zip(source_mean, target_mean, target_std)]).view(-1, 1, 1)

    def __call__(self, inputs: Tensor) -> Tensor:
        if self.scale.device != inputs.device:  # moved once, on first use
            self.scale, self.shift = self.scale.to(inputs.device), self.shift.to(inputs.device)
        return torch.addcmul(self.shift.to(inputs.dtype), inputs, self.scale.to(inputs.dtype))


# timm's pretrained_cfg interpolation names -> F.interpolate modes; others (timm's "random") resize bilinearly.
INTERPOLATION_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


@dataclass(frozen=True)
class Resize:
    """Inputs resized to the (H, W) a pretrained teacher was trained at, with its interpolation.

    Antialiased like torchvision's Resize, so a downscale does not alias.
    Resampling is linear, so resizing normalized inputs equals normalizing resized pixels.
    """

    size: tuple[int, int]
    interpolation: str = "bilinear"

    def __call__(self, inputs: Tensor) -> Tensor:
        if tuple(inputs.shape[-2:]) == self.size:
            return inputs
        mode = INTERPOLATION_MODES.get(self.interpolation, "bilinear")
        if mode == "nearest":
            return F.interpolate(inputs, size=self.size, mode=mode)
        return F.interpolate(inputs, size=self.size, mode=mode, align_corners=False, antialias=True)


class FrozenTeacher:
    """A teacher network in eval mode without gradients, run under ``torch.inference_mode`` on whatever it is asked.

    ``renormalize`` maps the run's normalized inputs to the teacher's own
    normalization; None when the two agree.  ``resize`` brings them to a
    pretrained teacher's input size; None keeps the student's.  ``compile``:
    the teacher's forward is compiled on its own (``train.compile``), apart
    from the student's.
    """

    def __init__(
        self, network: nn.Module, renormalize: Renormalization | None = None, resize: Resize | None = None, *, compile: Callable[[Any], Any] | None = None
    ) -> None:
        self.network = network.eval().requires_grad_(False)
        self.renormalize = renormalize
        self.resize = resize
        self._outputs = self._eager_outputs if compile is None else compile(self._eager_outputs)

    def own_inputs(self, inputs: Tensor) -> Tensor:
        """``inputs`` as the teacher was trained to see them."""
        inputs = inputs if self.resize is None else self.resize(inputs)
        return inputs if self.renormalize is None else self.renormalize(inputs)

    def logits(self, batch: Batch) -> Tensor:
        return self._run(batch.inputs, (), "logits")

    def logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Logits and the features at stage ``indices`` (ascending stage order) in one forward."""
        return self._run(inputs, tuple(indices), "both")

    def features(self, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Only the features at stage ``indices``, stopping after the deepest."""
        return self._run(inputs, tuple(indices), "features")

    def module_features(self, inputs: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """Logits and the outputs of the modules called ``names`` (forward hooks: any network) in one forward."""
        tap_modules(self.network, names)  # before the (compiled) forward runs
        return self._run(inputs, tuple(names), "modules")

    def _run(self, inputs: Tensor, indices: tuple[int, ...] | tuple[str, ...], what: str) -> Any:
        with torch.inference_mode():
            outputs = self._outputs(inputs, indices, what)
        # Inference tensors cannot be saved for a backward: a loss that multiplies by them needs normal copies.
        return tree_map_only(Tensor, torch.clone, outputs)

    def _eager_outputs(self, inputs: Tensor, indices: tuple[int, ...] | tuple[str, ...], what: str) -> Any:
        inputs = self.own_inputs(inputs)
        if what == "logits":
            return self.network(inputs)
        if what == "both":
            return logits_and_features(self.network, inputs, indices)
        if what == "modules":
            return module_features(self.network, inputs, indices)
        return stage_features(self.network, inputs, indices)

    def feature_shapes(self, input_size: tuple[int, int, int]) -> list[torch.Size]:
        """Stage feature shapes for the student's ``input_size``, as the teacher sees it (resized, if it is)."""
        seen = input_size if self.resize is None else (input_size[0], *self.resize.size)
        return feature_shapes(self.network, seen)

    def on_epoch_start(self, epoch: int) -> None:
        """Sources that keep per-epoch tables switch them here."""

    def on_epoch_end(self, epoch: int) -> dict[str, int]:
        """Per-epoch numbers worth logging (none for a plain network)."""
        return {}
