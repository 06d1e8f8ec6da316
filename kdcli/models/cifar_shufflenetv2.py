"""CIFAR ShuffleNetV2 of the KD literature (RepDistiller/CRD ``models/ShuffleNetv2.py``), registered in timm.

Model: ``cifar_shufflenetv2``, RepDistiller's ``ShuffleV2`` (net size 1x): stage widths
116-232-464 after a 1x1, 24-channel stem at full resolution, each stage one stride-2
down-sampling unit followed by 3-7-3 basic units (Ma et al. 2018), then a 1x1 conv to 1024
channels.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1``, ``bn1``,
``layer{1,2,3}.0.{conv,bn}{1..5}`` for the down-sampling unit, ``layer{1,2,3}.{i}.{conv,bn}{1..3}``
for the basic units, ``conv2``, ``bn2``, ``linear``), so the ``model`` entry of a RepDistiller
checkpoint loads with ``load_state_dict(strict=True)``.

Differences from RepDistiller: global average pooling is adaptive (equal to its
``avg_pool2d(., 4)`` at 32x32), ``in_chans`` is configurable, units return only their output
(RepDistiller's ``preact`` features are not exposed), and weights keep PyTorch's default
initialisation, as RepDistiller's (it has no init of its own).

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem, after conv1-bn1-ReLU (``act1``), stride 1; 1..3 = ``layer{1,2,3}`` output, stride
2, 4, 8. These are RepDistiller's ``f0..f3``; the 1x1 conv ``conv2``-``bn2``-ReLU runs after
stage 3 (``forward_features`` returns its 1024-channel output; ``norm`` has no effect).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import CifarNet, build_feature_info, channel_shuffle, cifar_pretrained_cfg, conv1x1

__all__ = ['CifarShuffleNetV2', 'BasicUnit', 'DownsampleUnit']

STEM_WIDTH = 24
STAGE_NAMES = ('layer1', 'layer2', 'layer3')


def depthwise3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


class BasicUnit(nn.Module):
    """Keeps the first half of the channels, transforms the second, concatenates and shuffles."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kept_chs = channels // 2
        branch_chs = channels - self.kept_chs
        self.conv1 = conv1x1(branch_chs, branch_chs)
        self.bn1 = nn.BatchNorm2d(branch_chs)
        self.conv2 = depthwise3x3(branch_chs, stride=1)
        self.bn2 = nn.BatchNorm2d(branch_chs)
        self.conv3 = conv1x1(branch_chs, branch_chs)
        self.bn3 = nn.BatchNorm2d(branch_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, :self.kept_chs], x[:, self.kept_chs:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownsampleUnit(nn.Module):
    """Stride-2 unit: two branches on the whole input, each to half the output width."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        mid_chs = out_chs // 2
        # left branch: depthwise 3x3 (stride 2) - 1x1
        self.conv1 = depthwise3x3(in_chs, stride=2)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = conv1x1(in_chs, mid_chs)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        # right branch: 1x1 - depthwise 3x3 (stride 2) - 1x1
        self.conv3 = conv1x1(in_chs, mid_chs)
        self.bn3 = nn.BatchNorm2d(mid_chs)
        self.conv4 = depthwise3x3(mid_chs, stride=2)
        self.bn4 = nn.BatchNorm2d(mid_chs)
        self.conv5 = conv1x1(mid_chs, mid_chs)
        self.bn5 = nn.BatchNorm2d(mid_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


def make_stage(in_chs: int, out_chs: int, num_units: int) -> nn.Sequential:
    return nn.Sequential(DownsampleUnit(in_chs, out_chs), *[BasicUnit(out_chs) for _ in range(num_units)])


class CifarShuffleNetV2(CifarNet):
    """RepDistiller's CIFAR ShuffleNetV2 with timm's model API."""

    stem_modules = ('conv1', 'bn1', 'act1')
    stage_modules = tuple((name,) for name in STAGE_NAMES)
    final_modules = ('conv2', 'bn2', 'act2')
    head_name = 'linear'

    def __init__(
            self,
            stage_widths: tuple[int, int, int] = (116, 232, 464),
            stage_units: tuple[int, int, int] = (3, 7, 3),
            head_width: int = 1024,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            stage_widths: Output channels of stages 1-3.
            stage_units: Basic units per stage, after its down-sampling unit.
            head_width: Output channels of the final 1x1 conv.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: timm pooling type before ``linear``.
        """
        super().__init__(
            num_classes,
            build_feature_info((STEM_WIDTH, 'act1'), list(zip(stage_widths, STAGE_NAMES)), stage_strides=(2, 2, 2)),
        )
        self.conv1 = conv1x1(in_chans, STEM_WIDTH)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = STEM_WIDTH
        for name, out_chs, num_units in zip(STAGE_NAMES, stage_widths, stage_units):
            setattr(self, name, make_stage(in_chs, out_chs, num_units))
            in_chs = out_chs
        self.conv2 = conv1x1(in_chs, head_width)
        self.bn2 = nn.BatchNorm2d(head_width)
        self.act2 = nn.ReLU(inplace=True)
        self.init_head(global_pool, final_chs=head_width)


default_cfgs = generate_default_cfgs({
    'cifar_shufflenetv2': cifar_pretrained_cfg(pool_size=(4, 4), classifier='linear'),
})


@register_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV2:
    """ShuffleNetV2 1x, widths 116-232-464-1024 (RepDistiller ``ShuffleV2``)."""
    return build_model_with_cfg(
        CifarShuffleNetV2,
        'cifar_shufflenetv2',
        pretrained,
        stage_widths=(116, 232, 464),
        stage_units=(3, 7, 3),
        head_width=1024,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )
