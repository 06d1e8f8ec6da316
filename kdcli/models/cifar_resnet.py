"""CIFAR ResNets of the KD literature (RepDistiller/CRD ``models/resnet.py``), registered in timm.

Models: ``cifar_resnet{8,14,20,32,44,56,110}`` (stage widths 16-16-32-64) and
``cifar_resnet8x4``, ``cifar_resnet32x4`` (32-64-128-256). Depth is 6n+2 with n BasicBlocks
per stage, as in He et al. 2016, section 4.2.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``layer{1,2,3}.0.downsample.{0,1}``, ``fc``), so
the ``model`` entry of a RepDistiller checkpoint loads with ``load_state_dict(strict=True)``,
or directly via ``timm.create_model(name, checkpoint_path=path)``.

Differences from RepDistiller: global average pooling is adaptive (any input >= 8x8; equal
to its ``AvgPool2d(8)`` at 32x32), ``in_chans`` is configurable, and blocks return only their
output (RepDistiller's ``preact`` features are not exposed).

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem, after conv1-bn1-relu (``act1``), stride 1;
1 = ``layer1`` output, stride 1; 2 = ``layer2`` output, stride 2; 3 = ``layer3`` output, stride 4.
These are RepDistiller's ``f0..f3``; each is post-ReLU, so ``norm`` has no effect.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import (
    STAGE_STRIDES,
    CifarNet,
    build_feature_info,
    cifar_pretrained_cfg,
    conv1x1,
    conv3x3,
    init_conv_bn_weights,
)

__all__ = ['CifarResNet', 'BasicBlock']

NARROW_WIDTHS = (16, 16, 32, 64)
WIDE_WIDTHS = (32, 64, 128, 256)  # the "x4" teacher/student variants
STAGE_NAMES = ('layer1', 'layer2', 'layer3')


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = projection_shortcut(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


def projection_shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN where the shape changes (RepDistiller's ``downsample``), else None."""
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))


def make_stage(in_chs: int, out_chs: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs, out_chs, stride)]
    blocks += [BasicBlock(out_chs, out_chs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class CifarResNet(CifarNet):
    """RepDistiller's CIFAR ResNet with BasicBlocks and timm's model API."""

    stem_modules = ('conv1', 'bn1', 'act1')
    stage_modules = (('layer1',), ('layer2',), ('layer3',))

    def __init__(
            self,
            depth: int,
            widths: Sequence[int] = NARROW_WIDTHS,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            depth: Number of conv/fc layers, 6n+2.
            widths: Channels of the stem and of stages 1-3.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: timm pooling type before ``fc``.
        """
        if (depth - 2) % 6 != 0:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}')
        if len(widths) != 4:
            raise ValueError(f'widths needs 4 entries (stem + 3 stages), got {widths}')
        blocks_per_stage = (depth - 2) // 6
        stem_chs, stage_chs = widths[0], widths[1:]
        super().__init__(
            num_classes,
            build_feature_info((stem_chs, 'act1'), list(zip(stage_chs, STAGE_NAMES))),
        )
        self.conv1 = conv3x3(in_chans, stem_chs)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = stem_chs
        for name, out_chs, stride in zip(STAGE_NAMES, stage_chs, STAGE_STRIDES):
            setattr(self, name, make_stage(in_chs, out_chs, blocks_per_stage, stride))
            in_chs = out_chs
        self.init_head(global_pool)
        init_conv_bn_weights(self)


default_cfgs = generate_default_cfgs({
    name: cifar_pretrained_cfg()
    for name in (
        'cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44',
        'cifar_resnet56', 'cifar_resnet110', 'cifar_resnet8x4', 'cifar_resnet32x4',
    )
})


def _create_cifar_resnet(variant: str, pretrained: bool, depth: int, widths: Sequence[int], **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        depth=depth,
        widths=widths,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8, 16-16-32-64 (RepDistiller ``resnet8``)."""
    return _create_cifar_resnet('cifar_resnet8', pretrained, depth=8, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-14, 16-16-32-64 (RepDistiller ``resnet14``)."""
    return _create_cifar_resnet('cifar_resnet14', pretrained, depth=14, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20, 16-16-32-64 (RepDistiller ``resnet20``)."""
    return _create_cifar_resnet('cifar_resnet20', pretrained, depth=20, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32, 16-16-32-64 (RepDistiller ``resnet32``)."""
    return _create_cifar_resnet('cifar_resnet32', pretrained, depth=32, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44, 16-16-32-64 (RepDistiller ``resnet44``)."""
    return _create_cifar_resnet('cifar_resnet44', pretrained, depth=44, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56, 16-16-32-64 (RepDistiller ``resnet56``)."""
    return _create_cifar_resnet('cifar_resnet56', pretrained, depth=56, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110, 16-16-32-64 (RepDistiller ``resnet110``)."""
    return _create_cifar_resnet('cifar_resnet110', pretrained, depth=110, widths=NARROW_WIDTHS, **kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8x4, 32-64-128-256 (RepDistiller ``resnet8x4``)."""
    return _create_cifar_resnet('cifar_resnet8x4', pretrained, depth=8, widths=WIDE_WIDTHS, **kwargs)


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32x4, 32-64-128-256 (RepDistiller ``resnet32x4``)."""
    return _create_cifar_resnet('cifar_resnet32x4', pretrained, depth=32, widths=WIDE_WIDTHS, **kwargs)
