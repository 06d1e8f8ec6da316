"""CIFAR ResNet-50 of the KD literature (RepDistiller/CRD ``models/resnetv2.py``), registered in timm.

Model: ``cifar_resnet50``, RepDistiller's ``ResNet50``: the ImageNet ResNet-50 layout
(bottleneck blocks 3-4-6-3, widths 256-512-1024-2048, He et al. 2016) with a 3x3 stride-1
stem and no max-pool, so a 32x32 input ends at 4x4. Post-activation, like ``cifar_resnet``;
the stem is 64 channels wide and there are four stages, hence a family of its own.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1``, ``bn1``,
``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``layer{1..4}.0.shortcut.{0,1}``,
``linear``), so the ``model`` entry of a RepDistiller checkpoint loads with
``load_state_dict(strict=True)``.

Differences from RepDistiller: ``in_chans`` is configurable, blocks return only their output
(RepDistiller's ``preact`` features are not exposed), and ``zero_init_residual`` (off in
RepDistiller) is not offered.

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem, after conv1-bn1-ReLU (``act1``), stride 1; 1..4 = ``layer{1..4}`` output, stride
1, 2, 4, 8. These are RepDistiller's ``f0..f4`` (post-ReLU; ``norm`` has no effect).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import (
    CifarNet,
    build_feature_info,
    cifar_pretrained_cfg,
    conv1x1,
    conv3x3,
    init_conv_bn_weights,
)

__all__ = ['CifarResNet50', 'Bottleneck']

STEM_WIDTH = 64
BOTTLENECK_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STAGE_NAMES = ('layer1', 'layer2', 'layer3', 'layer4')
STAGE_STRIDES = (1, 2, 2, 2)


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), 1x1-3x3-1x1."""

    def __init__(self, in_chs: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_chs = width * EXPANSION
        self.conv1 = conv1x1(in_chs, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_chs)
        self.bn3 = nn.BatchNorm2d(out_chs)
        # An empty Sequential is the identity, as in RepDistiller (no state_dict entries).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_chs: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [Bottleneck(in_chs, width, stride)]
    blocks += [Bottleneck(width * EXPANSION, width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class CifarResNet50(CifarNet):
    """RepDistiller's CIFAR ResNet with bottleneck blocks and four stages, with timm's model API."""

    stem_modules = ('conv1', 'bn1', 'act1')
    stage_modules = tuple((name,) for name in STAGE_NAMES)
    head_name = 'linear'

    def __init__(
            self,
            stage_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            stage_blocks: Bottleneck blocks per stage (3-4-6-3 = ResNet-50).
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: timm pooling type before ``linear``.
        """
        stage_chs = [width * EXPANSION for width in BOTTLENECK_WIDTHS]
        super().__init__(
            num_classes,
            build_feature_info((STEM_WIDTH, 'act1'), list(zip(stage_chs, STAGE_NAMES)), stage_strides=STAGE_STRIDES),
        )
        self.conv1 = conv3x3(in_chans, STEM_WIDTH)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = STEM_WIDTH
        for name, width, num_blocks, stride in zip(STAGE_NAMES, BOTTLENECK_WIDTHS, stage_blocks, STAGE_STRIDES):
            setattr(self, name, make_stage(in_chs, width, num_blocks, stride))
            in_chs = width * EXPANSION
        self.init_head(global_pool)
        init_conv_bn_weights(self)  # the linear layer keeps PyTorch's default init, as in RepDistiller


default_cfgs = generate_default_cfgs({
    'cifar_resnet50': cifar_pretrained_cfg(pool_size=(4, 4), classifier='linear'),
})


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs: Any) -> CifarResNet50:
    """ResNet-50 for 32x32 inputs (RepDistiller ``ResNet50``)."""
    return build_model_with_cfg(
        CifarResNet50,
        'cifar_resnet50',
        pretrained,
        stage_blocks=(3, 4, 6, 3),
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )
