"""Logits of a model over a whole split: what ``eval``, test reports and teacher checks use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdcli.data.augment import normalize
from kdcli.data.loading import Split, split_loader

InputTransform = Callable[[Tensor, Tensor], Tensor]  # (normalized inputs, sample index) -> inputs


def predict(
    model: nn.Module,
    split: Split,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int,
    transform: InputTransform | None = None,
) -> Tensor:
    """Logits for every sample of ``split`` in order (no augmentation; ``transform``, e.g. noise, if given), on the CPU."""
    loader = split_loader(split, batch_size=batch_size, shuffle=False, device=device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = []
        for images, _, index in loader:
            inputs = normalize(images, mean, std)
            if transform is not None:
                inputs = transform(inputs, index)
            logits.append(model(inputs).float().cpu())
    model.train(was_training)
    return torch.cat(logits)
