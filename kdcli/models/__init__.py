"""Model creation: any timm model by name, including the CIFAR zoo registered into timm."""

from __future__ import annotations

import timm
from torch import nn

from kdcli.errors import unknown_name


def create_model(name: str, *, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """Build an untrained ``name`` for ``num_classes`` classes and (C, H, W) inputs.

    Models with a fixed input size (ViTs and friends) are told the image size;
    convolutional models adapt to it by pooling.
    """
    if not timm.is_model(name):
        raise unknown_name("model", name, timm.list_models())
    in_chans, height, width = input_size
    options: dict[str, object] = {"num_classes": num_classes, "in_chans": in_chans}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        options["img_size"] = (height, width)
    return timm.create_model(name, pretrained=False, **options)
