"""Intermediate features of timm-style models, selected by stage index (``forward_intermediates``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdcli.errors import UsageError


def _feature_model(model: nn.Module) -> nn.Module:
    if not callable(getattr(model, "forward_intermediates", None)):
        raise UsageError(f"model {type(model).__name__} has no forward_intermediates: its features cannot be selected by stage index")
    return model


def logits_and_features(model: nn.Module, inputs: Tensor, indices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Logits and the features at stage ``indices`` (ascending stage order, whatever the order given), in one forward."""
    final, features = _feature_model(model).forward_intermediates(inputs, indices=list(indices))
    return model.forward_head(final), features


def stage_features(model: nn.Module, inputs: Tensor, indices: Sequence[int]) -> list[Tensor]:
    """Only the features at stage ``indices`` (ascending stage order), stopping after the deepest."""
    return _feature_model(model).forward_intermediates(inputs, indices=list(indices), intermediates_only=True, stop_early=True)


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
