"""Shared pieces of the CIFAR model zoo (``cifar_resnet``, ``cifar_wrn``, ``cifar_vgg``,
``cifar_mobilenetv2``, ``cifar_shufflenetv1``, ``cifar_shufflenetv2``, ``cifar_resnet50``).

All families have the same shape: a stem, n stages, optional final modules (a final norm
in pre-activation nets, a 1x1 head conv in MobileNetV2/ShuffleNetV2), global pooling and a
linear classifier. ``CifarNet`` implements timm's model API once on top of that shape;
subclasses register their modules and name them in forward order.

Stage indices, used by ``feature_info``, ``forward_intermediates`` and ``features_only``:
0 = stem output, 1..n = output of stage 1..n. They equal RepDistiller's ``is_feat``
features ``f0..fn`` (with ``preact=False``; the pooled vector is not a stage), so
feature-KD recipes port index for index.
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


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: [N, g*c, H, W] -> channel order c-major."""
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)


def build_feature_info(
        stem: tuple[int, str],
        stages: Sequence[tuple[int, str]],
        stage_strides: Sequence[int] = STAGE_STRIDES,
        stem_reduction: int = 1,
) -> list[dict[str, Any]]:
    """One timm feature_info entry per stage index; each item is (channels, module name)."""
    if len(stages) != len(stage_strides):
        raise ValueError(f'{len(stages)} stages but {len(stage_strides)} strides')
    feature_info = [dict(num_chs=stem[0], reduction=stem_reduction, module=stem[1])]
    reduction = stem_reduction
    for (num_chs, module), stride in zip(stages, stage_strides):
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

    A subclass names its top-level modules, in forward order: ``stem_modules`` (stage index
    0), ``stage_modules`` (one tuple per stage index 1..n), ``final_modules`` (run between the
    last stage and pooling: a final norm, or a 1x1 head conv). It registers them in that order
    (timm's ``features_only`` wrapper replays the top-level children in registration order; a
    dotted name reaches into a top-level ``nn.Sequential``, which needs
    ``feature_cfg=dict(flatten_sequential=True)``), then calls ``init_head``.
    """

    stem_modules: tuple[str, ...]
    stage_modules: tuple[tuple[str, ...], ...]
    final_modules: tuple[str, ...] = ()
    # True when ``final_modules`` are a norm + activation of the last stage (pre-activation
    # nets): only then does ``forward_intermediates(norm=True)`` take the last stage after them.
    final_is_norm: bool = False
    # Attribute of the classifier; the reference code's name, so its checkpoints load.
    head_name: str = 'fc'

    def __init__(self, num_classes: int, feature_info: list[dict[str, Any]]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = feature_info[-1]['num_chs']

    def init_head(self, global_pool: str, final_chs: int | None = None) -> None:
        """Pooling and classifier; ``final_chs`` when ``final_modules`` change the width."""
        if final_chs is not None:
            self.num_features = self.head_hidden_size = final_chs
        # Adaptive pooling: any input size works; at 32x32 it equals the reference's fixed-size pooling.
        self.global_pool, classifier = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        setattr(self, self.head_name, self.wrap_classifier(classifier))

    def wrap_classifier(self, classifier: nn.Module) -> nn.Module:
        """The module stored as the head; a subclass wraps it where the reference did."""
        return classifier

    def run_modules(self, names: Sequence[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_modules(self.stem_modules, x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_modules(self.final_modules, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for names in self.stage_modules:
            x = self.run_modules(names, x)
        return self.forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 = identity); keeps the pooling type unless given."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        placement = next(self.parameters())
        self.global_pool, classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        classifier.to(device=placement.device, dtype=placement.dtype)  # follow the model if it was moved
        setattr(self, self.head_name, self.wrap_classifier(classifier))

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
            norm: Take the last stage's feature after the final norm (pre-activation nets only,
                as timm's ResNetV2; no effect elsewhere). Without it, the last feature is the
                raw stage output.
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
        stages = self.stage_modules[:max_index] if stop_early else self.stage_modules

        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        for stage_index, names in enumerate(stages, start=1):
            x = self.run_modules(names, x)
            if stage_index in take_indices:
                intermediates.append(x)

        ran_all_stages = len(stages) == len(self.stage_modules)
        if ran_all_stages:
            x = self.forward_final(x)
            if norm and self.final_is_norm and len(self.stage_modules) in take_indices:
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
        """Drop the stages, final modules and head not needed to compute the given stage indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for names in self.stage_modules[max_index:]:
            for name in names:
                self.set_submodule(name, nn.Identity())
        prune_end = max_index < len(self.stage_modules)
        if prune_norm or prune_end:  # the final modules are sized for the last stage
            for name in self.final_modules:
                self.set_submodule(name, nn.Identity())
            pruned_width = self.feature_info[max_index]['num_chs']
            prune_head = prune_head or pruned_width != self.num_features
            self.num_features = self.head_hidden_size = pruned_width
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices
