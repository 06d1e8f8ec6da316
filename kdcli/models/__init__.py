"""Model creation: any timm model by name, including the CIFAR zoo registered into timm.

Importing this package registers the whole zoo, so ``timm.create_model("cifar_vgg8")``
works right after ``import kdcli.models`` (the load hint ``kdcli export`` prints and
its model card rely on it). The CLI imports it only when a command builds a model,
so ``kdcli --help`` still imports no torch.
"""

from __future__ import annotations

import timm
from torch import nn

from kdcli.errors import unknown_name

# Each module's @register_model factories join timm's registry on import (the entry points name the same modules).
from kdcli.models import (  # noqa: F401
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_resnet50,
    cifar_shufflenetv1,
    cifar_shufflenetv2,
    cifar_vgg,
    cifar_wrn,
)


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
