"""Intermediate features of a model: by stage index (timm's ``forward_intermediates``, the fast path)
or by module name (forward hooks, so any ``nn.Module`` serves, a transformers model or a user's own)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import partial
from typing import Any

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


def named_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The submodules of ``model`` called ``names`` (``named_modules()`` names); a missing name is one error listing them."""
    available = dict(model.named_modules())
    for name in names:
        if name not in available:
            known = [known for known in available if known]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(f"model {type(model).__name__} has no module named {name!r}; {hint}its modules: {', '.join(known)}")
    return {name: available[name] for name in names}


def tap_modules(model: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """Persistent forward hooks on the modules called ``names``, each keeping its latest output in the returned dict.

    Registered once per model and name, eagerly: a compiled forward then traces the
    hooks like any other code instead of breaking its graph to register them.
    """
    taps: dict[str, Any] = model.__dict__.setdefault("_feature_taps", {})
    for name, module in named_modules(model, [name for name in names if name not in taps]).items():
        taps[name] = None
        module.register_forward_hook(partial(_keep_output, taps, name))
    # Forget what a plain forward (validation) left in the taps: a compiled forward guards on them being None.
    taps.update(dict.fromkeys(taps))
    return taps


def module_features(model: nn.Module, inputs: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """Logits and the outputs of the modules called ``names`` (in the order given), from one forward.

    Through forward hooks (``tap_modules``); a module called more than once in a
    forward gives its last output.
    """
    taps = tap_modules(model, names)
    logits = model(inputs)
    features = [taps[name] for name in names]
    taps.update(dict.fromkeys(names))  # hold no activations (nor their graph) between forwards
    return logits, features


def _keep_output(outputs: dict[str, Any], name: str, module: nn.Module, args: Any, output: Any) -> None:
    outputs[name] = output
