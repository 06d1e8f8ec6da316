"""Teacher sources: what a method asks for a batch's teacher logits (or features).

A method never holds the teacher network itself: it asks its source per
batch.  ``FrozenTeacher`` runs a frozen network; ``kdcli.teacher_cache``
serves logits from a table behind the same seam.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdcli.features import feature_shapes, logits_and_features, stage_features
from kdcli.step import Batch


class FrozenTeacher:
    """A teacher network in eval mode without gradients, run on whatever it is asked."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        return self.network(batch.inputs)

    @torch.no_grad()
    def logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Logits and the features at stage ``indices`` (ascending stage order) in one forward."""
        return logits_and_features(self.network, inputs, indices)

    @torch.no_grad()
    def features(self, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Only the features at stage ``indices``, stopping after the deepest."""
        return stage_features(self.network, inputs, indices)

    def feature_shapes(self, input_size: tuple[int, int, int]) -> list[torch.Size]:
        return feature_shapes(self.network, input_size)

    def on_epoch_start(self, epoch: int) -> None:
        """Sources that keep per-epoch tables switch them here."""

    def on_epoch_end(self, epoch: int) -> dict[str, int]:
        """Per-epoch numbers worth logging (none for a plain network)."""
        return {}
