"""CIFAR ShuffleNetV1 of the KD literature (RepDistiller/CRD ``models/ShuffleNetv1.py``), registered in timm.

Model: ``cifar_shufflenetv1``, RepDistiller's ``ShuffleV1``: 3 groups, stage widths
240-480-960 with 4-8-4 units (Zhang et al. 2018) after a 1x1, 24-channel stem at full
resolution; each stage starts with a stride-2 unit that concatenates an average-pooled shortcut.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``linear``), so the ``model`` entry of a
RepDistiller checkpoint loads with ``load_state_dict(strict=True)``.

Differences from RepDistiller: global average pooling is adaptive (equal to its
``avg_pool2d(., 4)`` at 32x32), ``in_chans`` is configurable, units return only their output
(RepDistiller's ``preact`` features are not exposed), and weights keep PyTorch's default
initialisation, as RepDistiller's (it has no init of its own).

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = stem, after conv1-bn1-ReLU (``act1``), stride 1; 1..3 = ``layer{1,2,3}`` output, stride
2, 4, 8. These are RepDistiller's ``f0..f3`` (post-ReLU; ``norm`` has no effect).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import CifarNet, build_feature_info, channel_shuffle, cifar_pretrained_cfg, conv1x1

__all__ = ['CifarShuffleNetV1', 'ShuffleUnit']

STEM_WIDTH = 24
STAGE_NAMES = ('layer1', 'layer2', 'layer3')


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1 bottleneck (ShuffleNetV1 unit).

    Stride 1 adds the input; stride 2 concatenates the input average-pooled to the new
    resolution, so ``out_chs`` is the width of the residual branch only.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_chs = out_chs // 4
        # The first unit after the 24-channel stem has too few inputs for grouping (as in the paper).
        self.first_groups = 1 if in_chs == STEM_WIDTH else groups
        self.conv1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


def make_stage(in_chs: int, out_chs: int, num_units: int, groups: int) -> nn.Sequential:
    # The stride-2 unit's branch is narrower by the concatenated input's width.
    units = [ShuffleUnit(in_chs, out_chs - in_chs, stride=2, groups=groups)]
    units += [ShuffleUnit(out_chs, out_chs, stride=1, groups=groups) for _ in range(num_units - 1)]
    return nn.Sequential(*units)


class CifarShuffleNetV1(CifarNet):
    """RepDistiller's CIFAR ShuffleNetV1 with timm's model API."""

    stem_modules = ('conv1', 'bn1', 'act1')
    stage_modules = tuple((name,) for name in STAGE_NAMES)
    head_name = 'linear'

    def __init__(
            self,
            stage_widths: tuple[int, int, int] = (240, 480, 960),
            stage_units: tuple[int, int, int] = (4, 8, 4),
            groups: int = 3,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ) -> None:
        """
        Args:
            stage_widths: Output channels of stages 1-3.
            stage_units: Units per stage.
            groups: Groups of the 1x1 convs.
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
            setattr(self, name, make_stage(in_chs, out_chs, num_units, groups))
            in_chs = out_chs
        self.init_head(global_pool)


default_cfgs = generate_default_cfgs({
    'cifar_shufflenetv1': cifar_pretrained_cfg(pool_size=(4, 4), classifier='linear'),
})


@register_model
def cifar_shufflenetv1(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV1:
    """ShuffleNetV1, g = 3, widths 240-480-960 (RepDistiller ``ShuffleV1``)."""
    return build_model_with_cfg(
        CifarShuffleNetV1,
        'cifar_shufflenetv1',
        pretrained,
        stage_widths=(240, 480, 960),
        stage_units=(4, 8, 4),
        groups=3,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )
