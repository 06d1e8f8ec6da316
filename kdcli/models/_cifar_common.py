"""Shared pieces of the CIFAR model zoo (``cifar_resnet``, ``cifar_wrn``).

Both families have the same shape: a stem, three stages (strides 1, 2, 2), an optional
final norm (pre-activation nets only), global pooling and a linear ``fc``. ``CifarNet``
implements timm's model API once on top of that shape; subclasses register their modules
and say how to run the stem and the final norm.

Stage indices, used by ``feature_info``, ``forward_intermediates`` and ``features_only``:
0 = stem output, 1..3 = output of stage 1..3. They equal RepDistiller's ``is_feat``
features ``f0..f3`` (with ``preact=False``), so feature-KD recipes port index for index.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import create_classifier
from timm.models._features import feature_take_indices
from torch import nn

# Normalisation used by RepDistiller/CRD for CIFAR-100 (dataset/cifar100.py).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# Stride of each stage relative to the input; the stem keeps full resolution.
STAGE_STRIDES = (1, 2, 2)


def cifar_pretrained_cfg(**overrides: Any) -> dict[str, Any]:
    """timm pretrained_cfg for a CIFAR-100 model (no hosted weights)."""
    cfg: dict[str, Any] = dict(
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,  # CIFAR is evaluated uncropped
        interpolation='bilinear',
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        num_classes=100,
        first_conv='conv1',
        classifier='fc',
        origin_url='https://github.com/HobbitLong/RepDistiller',
        paper_ids='arXiv:1910.10699',
    )
    cfg.update(overrides)
    return cfg


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


def build_feature_info(stem: tuple[int, str], stages: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    """One timm feature_info entry per stage index; each item is (channels, module name)."""
    feature_info = [dict(num_chs=stem[0], reduction=1, module=stem[1])]
    reduction = 1
    for (num_chs, module), stride in zip(stages, STAGE_STRIDES):
        reduction *= stride
        feature_info.append(dict(num_chs=num_chs, reduction=reduction, module=module))
    return feature_info


def init_conv_bn_weights(model: nn.Module) -> None:
    """RepDistiller's init: He-normal (fan_out) convs, unit-scale zero-shift BN."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarNet(nn.Module):
    """timm model API shared by the CIFAR families.

    Subclasses register, in forward order (timm's ``features_only`` wrapper replays the
    top-level children in registration order): the stem modules, the stages named in
    ``stage_names``, any final-norm modules, then call ``init_head``.
    """

    stage_names: tuple[str, str, str]

    def __init__(self, num_classes: int, feature_info: list[dict[str, Any]]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = feature_info[-1]['num_chs']

    def init_head(self, global_pool: str) -> None:
        # Adaptive pooling: any input >= 8x8 works; at 32x32 it equals RepDistiller's AvgPool2d(8).
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Norm + activation after the last stage; identity for post-activation nets."""
        return x

    def remove_final_norm(self) -> None:
        """Replace the final-norm modules by identities (no-op for post-activation nets)."""

    def stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.stages():
            x = stage(x)
        return self.forward_final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``fc`` for ``num_classes`` (0 = identity); keeps the pooling type unless given."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        placement = next(self.parameters())
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.fc.to(device=placement.device, dtype=placement.dtype)  # follow the model if it was moved

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the selected stage indices, timm convention.

        Args:
            x: Input images, NCHW.
            indices: None = all stages, int n = last n stages, list = these stage indices
                (negative counts from the end).
            norm: Apply the final norm to the last stage's feature (pre-activation nets only;
                as timm's ResNetV2). Without it, the last feature is the raw stage output.
            stop_early: Stop after the deepest requested stage; unless that is the last stage,
                the returned final features are then its raw output.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of features.

        Returns:
            ``(final_features, intermediates)``, final_features being ``forward_features(x)``
            when all stages ran, or just ``intermediates`` if ``intermediates_only``.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages()[:max_index] if stop_early else self.stages()

        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        for stage_index, stage in enumerate(stages, start=1):
            x = stage(x)
            if stage_index in take_indices:
                intermediates.append(x)

        ran_all_stages = len(stages) == len(self.stage_names)
        if ran_all_stages:
            x = self.forward_final_norm(x)
            if norm and len(self.stage_names) in take_indices:
                intermediates[-1] = x  # the last stage is always the last one appended
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) not needed to compute the given stage indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Identity())
        prune_end = max_index < len(self.stage_names)
        if prune_norm or prune_end:  # the final norm is sized for the last stage
            self.remove_final_norm()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices
