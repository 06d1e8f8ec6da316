"""CIFAR Wide ResNets of the KD literature (RepDistiller/CRD ``models/wrn.py``), registered in timm.

Models: ``cifar_wrn_{depth}_{widen}`` for WRN-16-1, WRN-16-2, WRN-40-1, WRN-40-2
(Zagoruyko & Komodakis 2016). Depth is 6n+4 with n pre-activation blocks per stage; stage
widths are 16k-32k-64k after a 16-channel stem conv.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}``, ``block{1,2,3}.layer.0.convShortcut``, the
final ``bn1``, ``fc``), so the ``model`` entry of a RepDistiller checkpoint loads with
``load_state_dict(strict=True)``, or directly via ``timm.create_model(name, checkpoint_path=path)``.

Differences from RepDistiller: global average pooling is adaptive (any input >= 8x8; equal to
its ``avg_pool2d(., 8)`` at 32x32) and ``in_chans`` is configurable. ``drop_rate`` is
RepDistiller's ``dropRate`` (dropout between the two convs of each block, default 0).

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem, the raw ``conv1`` output (pre-activation net: no norm in the stem), stride 1;
1 = ``block1`` output, stride 1; 2 = ``block2`` output, stride 2; 3 = ``block3`` output, stride 4.
All are raw (pre-BN) stage outputs, as RepDistiller's ``f0..f3`` and timm's ResNetV2. With
``forward_intermediates(norm=True)`` stage 3 is taken after the final ``bn1`` + ReLU instead,
i.e. the tensor the classifier head pools; ``forward_features`` always returns that.
"""
from __future__ import annotations

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

__all__ = ['CifarWideResNet', 'WideBasicBlock', 'WideStage']

STEM_WIDTH = 16
BASE_STAGE_WIDTHS = (16, 32, 64)  # multiplied by the widen factor
STAGE_NAMES = ('block1', 'block2', 'block3')


class WideBasicBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = conv3x3(out_chs, out_chs)
        # camelCase kept for RepDistiller state_dict compatibility.
        self.convShortcut = conv1x1(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.act1(self.bn1(x))
        # As in RepDistiller (and the original WRN code) the projection shortcut sees the
        # pre-activated input, the identity shortcut the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(preact)
        out = self.drop(self.act2(self.bn2(self.conv1(preact))))
        return self.conv2(out) + shortcut


class WideStage(nn.Module):
    """A stage of n blocks; the ``layer`` wrapper reproduces RepDistiller's ``NetworkBlock`` keys."""

    def __init__(self, in_chs: int, out_chs: int, num_blocks: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_chs, out_chs, stride, drop_rate)]
        blocks += [WideBasicBlock(out_chs, out_chs, 1, drop_rate) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class CifarWideResNet(CifarNet):
    """RepDistiller's CIFAR Wide ResNet with timm's model API."""

    stem_modules = ('conv1',)
    stage_modules = (('block1',), ('block2',), ('block3',))
    # Final norm of the pre-activation net; ``bn1`` is RepDistiller's name for it.
    final_modules = ('bn1', 'act')
    final_is_norm = True

    def __init__(
            self,
            depth: int,
            widen_factor: int = 1,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            depth: Number of conv/fc layers (shortcut convs not counted), 6n+4.
            widen_factor: Multiplier k of the stage widths 16-32-64.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            drop_rate: Dropout probability inside each block.
            global_pool: timm pooling type before ``fc``.
        """
        if (depth - 4) % 6 != 0:
            raise ValueError(f'Wide ResNet depth must be 6n+4, got {depth}')
        blocks_per_stage = (depth - 4) // 6
        stage_chs = [width * widen_factor for width in BASE_STAGE_WIDTHS]
        super().__init__(
            num_classes,
            build_feature_info((STEM_WIDTH, 'conv1'), list(zip(stage_chs, STAGE_NAMES))),
        )
        self.conv1 = conv3x3(in_chans, STEM_WIDTH)
        in_chs = STEM_WIDTH
        for name, out_chs, stride in zip(STAGE_NAMES, stage_chs, STAGE_STRIDES):
            setattr(self, name, WideStage(in_chs, out_chs, blocks_per_stage, stride, drop_rate))
            in_chs = out_chs
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.init_head(global_pool)
        init_conv_bn_weights(self)
        nn.init.zeros_(self.fc.bias)  # RepDistiller zeroes the classifier bias


default_cfgs = generate_default_cfgs({
    name: cifar_pretrained_cfg()
    for name in ('cifar_wrn_16_1', 'cifar_wrn_16_2', 'cifar_wrn_40_1', 'cifar_wrn_40_2')
})


def _create_cifar_wrn(variant: str, pretrained: bool, depth: int, widen_factor: int, **kwargs: Any) -> CifarWideResNet:
    return build_model_with_cfg(
        CifarWideResNet,
        variant,
        pretrained,
        depth=depth,
        widen_factor=widen_factor,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-1 (RepDistiller ``wrn_16_1``)."""
    return _create_cifar_wrn('cifar_wrn_16_1', pretrained, depth=16, widen_factor=1, **kwargs)


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-2 (RepDistiller ``wrn_16_2``)."""
    return _create_cifar_wrn('cifar_wrn_16_2', pretrained, depth=16, widen_factor=2, **kwargs)


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-1 (RepDistiller ``wrn_40_1``)."""
    return _create_cifar_wrn('cifar_wrn_40_1', pretrained, depth=40, widen_factor=1, **kwargs)


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-2 (RepDistiller ``wrn_40_2``)."""
    return _create_cifar_wrn('cifar_wrn_40_2', pretrained, depth=40, widen_factor=2, **kwargs)
