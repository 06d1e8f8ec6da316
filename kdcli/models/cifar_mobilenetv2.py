"""CIFAR MobileNetV2 of the KD literature (RepDistiller/CRD ``models/mobilenetv2.py``), registered in timm.

Model: ``cifar_mobilenetv2``, RepDistiller's ``MobileNetV2`` = ``mobile_half``: expansion 6,
width multiplier 0.5 (stage widths 8-12-16-32-48-80-160 after a 16-channel stem), a 1280-channel
1x1 head conv, stem stride 2 and block strides 1-1-2-2-1-2-1 (stride 16 in all).

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1.{0,1}``,
``blocks.{i}.{j}.conv.{0..7}``, ``conv2.{0,1}``, ``classifier.0``), so the ``model`` entry of a
RepDistiller checkpoint loads with ``load_state_dict(strict=True)``.

Differences from RepDistiller: global average pooling is adaptive (RepDistiller's
``AvgPool2d(2, ceil_mode=True)`` at 32x32 pools the whole 2x2 map, so they agree there), any
input size works (RepDistiller asserts a multiple of 32), and ``in_chans`` is configurable.
``blocks`` is an ``nn.Sequential`` (RepDistiller: ``nn.ModuleList``; the keys are the same).

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem ``conv1`` (conv-BN-ReLU), stride 2; 1 = after ``blocks.1``, stride 2;
2 = after ``blocks.2``, stride 4; 3 = after ``blocks.4``, stride 8; 4 = after ``blocks.6``,
stride 16. These are RepDistiller's ``f0..f4``; the 1x1 head conv ``conv2`` runs after stage 4
(``forward_features`` returns its 1280-channel output; ``norm`` has no effect).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import CifarNet, build_feature_info, cifar_pretrained_cfg

__all__ = ['CifarMobileNetV2', 'InvertedResidual']

# (expansion ratio, output width at multiplier 1, blocks, stride of the first block) per block group.
# A ratio of None is the net's expansion argument; the first group never expands.
BLOCK_GROUPS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
STEM_WIDTH = 32
HEAD_WIDTH = 1280  # not scaled down for multipliers <= 1, as in RepDistiller
# Stage index -> the block groups it runs (RepDistiller's f1..f4 follow groups 1, 2, 4 and 6).
STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


def conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when the shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid_chs = in_chs * expand_ratio
        self.use_residual = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, mid_chs, 1, bias=False),
            nn.BatchNorm2d(mid_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, bias=False),
            nn.BatchNorm2d(mid_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def make_block_group(in_chs: int, out_chs: int, num_blocks: int, stride: int, expand_ratio: int) -> nn.Sequential:
    blocks = [InvertedResidual(in_chs, out_chs, stride, expand_ratio)]
    blocks += [InvertedResidual(out_chs, out_chs, 1, expand_ratio) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def init_mobilenet_weights(model: nn.Module) -> None:
    """RepDistiller's init: He-normal (fan_out) convs, unit BN, N(0, 0.01) linear with zero bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


class CifarMobileNetV2(CifarNet):
    """RepDistiller's CIFAR MobileNetV2 with timm's model API."""

    stem_modules = ('conv1',)
    stage_modules = tuple(tuple(f'blocks.{group}' for group in groups) for groups in STAGE_GROUPS)
    final_modules = ('conv2',)
    head_name = 'classifier'

    def __init__(
            self,
            expand_ratio: int = 6,
            width_mult: float = 0.5,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            expand_ratio: Expansion of the inverted residuals after the first (RepDistiller's T).
            width_mult: Multiplier of the block widths (truncated to int, as RepDistiller).
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: timm pooling type before ``classifier``.
        """
        group_chs = [int(width * width_mult) for _, width, _, _ in BLOCK_GROUPS]
        stem_chs = int(STEM_WIDTH * width_mult)
        super().__init__(
            num_classes,
            build_feature_info(
                (stem_chs, 'conv1.2'),  # the stem's ReLU: timm's wrapper flattens top-level Sequentials
                [(group_chs[groups[-1]], f'blocks.{groups[-1]}') for groups in STAGE_GROUPS],
                stage_strides=(1, 2, 2, 2),
                stem_reduction=2,
            ),
        )
        self.conv1 = conv_bn_relu(in_chans, stem_chs, 3, stride=2)
        groups, in_chs = [], stem_chs
        for (ratio, _, num_blocks, stride), out_chs in zip(BLOCK_GROUPS, group_chs):
            groups.append(make_block_group(in_chs, out_chs, num_blocks, stride, ratio or expand_ratio))
            in_chs = out_chs
        self.blocks = nn.Sequential(*groups)
        head_chs = int(HEAD_WIDTH * width_mult) if width_mult > 1.0 else HEAD_WIDTH
        self.conv2 = conv_bn_relu(in_chs, head_chs, 1)
        self.init_head(global_pool, final_chs=head_chs)
        init_mobilenet_weights(self)

    def wrap_classifier(self, classifier: nn.Module) -> nn.Module:
        return nn.Sequential(classifier)  # RepDistiller's key: classifier.0

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[0]


default_cfgs = generate_default_cfgs({
    'cifar_mobilenetv2': cifar_pretrained_cfg(pool_size=(2, 2), first_conv='conv1.0', classifier='classifier.0'),
})


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2, expansion 6, width 0.5 (RepDistiller ``MobileNetV2`` = ``mobile_half``)."""
    return build_model_with_cfg(
        CifarMobileNetV2,
        'cifar_mobilenetv2',
        pretrained,
        expand_ratio=6,
        width_mult=0.5,
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4), flatten_sequential=True),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )
