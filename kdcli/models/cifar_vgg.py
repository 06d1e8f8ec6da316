"""CIFAR VGGs of the KD literature (RepDistiller/CRD ``models/vgg.py``), registered in timm.

Models: ``cifar_vgg{8,11,13,16,19}``, the batch-norm variants that RepDistiller's
``model_dict`` builds for ``vgg8`` .. ``vgg19`` (its ``vgg*_bn``). Five conv blocks of
3x3 convs (with bias) + BN + ReLU, widths 64-128-256-512-512, no fully connected layers
but the classifier; the blocks' conv counts are configurations S (VGG-8), A, B, D, E.

Checkpoint compatibility: the state_dict keys are RepDistiller's (``block{0..4}.{i}``, where
``i`` counts the conv, BN and ReLU layers of the block, and ``classifier``), so the ``model``
entry of a RepDistiller checkpoint loads with ``load_state_dict(strict=True)``.

Differences from RepDistiller: ``in_chans`` is configurable, and max-pooling before
``block4`` (RepDistiller's ``pool3``) is never applied: RepDistiller applies it only to 64x64
inputs, and a fixed ``feature_info`` needs one stride per stage, so the CIFAR (32x32)
behaviour is kept for every input size. Global pooling is adaptive, as RepDistiller's.

Stage indices (``feature_info``, ``forward_intermediates``, ``features_only``):
0 = ``block0`` + ReLU, stride 1; 1..3 = ``pool{i-1}`` + ``block{i}`` + ReLU, stride 2, 4, 8;
4 = ``block4`` + ReLU, stride 8. These are RepDistiller's ``f0..f4`` (post-ReLU; ``norm`` has
no effect).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdcli.models._cifar_common import CifarNet, build_feature_info, cifar_pretrained_cfg

__all__ = ['CifarVGG']

# Conv widths of blocks 0..4, one entry per conv (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
BLOCK_WIDTHS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
STAGE_STRIDES = (2, 2, 2, 1)  # max-pool before blocks 1-3; none before block 4 at CIFAR size


def make_block(in_chs: int, widths: Sequence[int]) -> nn.Sequential:
    """conv-BN-ReLU per width, without the last ReLU (the net applies it outside the block)."""
    layers: list[nn.Module] = []
    for out_chs in widths:
        layers += [nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    return nn.Sequential(*layers[:-1])


def init_vgg_weights(model: nn.Module) -> None:
    """RepDistiller's init: He-normal (fan_out) convs with zero bias, unit BN, N(0, 0.01) linear."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


class CifarVGG(CifarNet):
    """RepDistiller's CIFAR VGG with batch norm and timm's model API."""

    stem_modules = ('block0', 'act0')
    stage_modules = (('pool0', 'block1', 'act1'), ('pool1', 'block2', 'act2'), ('pool2', 'block3', 'act3'), ('block4', 'act4'))
    head_name = 'classifier'

    def __init__(self, depth: int, num_classes: int = 100, in_chans: int = 3, global_pool: str = 'avg') -> None:
        """
        Args:
            depth: 8, 11, 13, 16 or 19 (conv layers + classifier).
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: timm pooling type before ``classifier``.
        """
        if depth not in BLOCK_WIDTHS:
            raise ValueError(f'CIFAR VGG depth must be one of {sorted(BLOCK_WIDTHS)}, got {depth}')
        block_widths = BLOCK_WIDTHS[depth]
        stage_chs = [widths[-1] for widths in block_widths]
        super().__init__(
            num_classes,
            build_feature_info(
                (stage_chs[0], 'act0'), [(chs, f'act{index}') for index, chs in enumerate(stage_chs[1:], start=1)],
                stage_strides=STAGE_STRIDES,
            ),
        )
        in_chs = in_chans
        for index, widths in enumerate(block_widths):
            if 0 < index < len(block_widths) - 1:
                setattr(self, f'pool{index - 1}', nn.MaxPool2d(kernel_size=2, stride=2))
            setattr(self, f'block{index}', make_block(in_chs, widths))
            setattr(self, f'act{index}', nn.ReLU())
            in_chs = widths[-1]
        self.init_head(global_pool)
        init_vgg_weights(self)


default_cfgs = generate_default_cfgs({
    f'cifar_vgg{depth}': cifar_pretrained_cfg(pool_size=(4, 4), first_conv='block0.0', classifier='classifier')
    for depth in BLOCK_WIDTHS
})


def _create_cifar_vgg(variant: str, pretrained: bool, depth: int, **kwargs: Any) -> CifarVGG:
    return build_model_with_cfg(
        CifarVGG,
        variant,
        pretrained,
        depth=depth,
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        kwargs_filter=('img_size',),  # fully convolutional: any input size works
        **kwargs,
    )


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-8 with BN (RepDistiller ``vgg8``, i.e. ``vgg8_bn``)."""
    return _create_cifar_vgg('cifar_vgg8', pretrained, depth=8, **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11 with BN (RepDistiller ``vgg11``, i.e. ``vgg11_bn``)."""
    return _create_cifar_vgg('cifar_vgg11', pretrained, depth=11, **kwargs)


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-13 with BN (RepDistiller ``vgg13``, i.e. ``vgg13_bn``)."""
    return _create_cifar_vgg('cifar_vgg13', pretrained, depth=13, **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16 with BN (RepDistiller ``vgg16``, i.e. ``vgg16_bn``)."""
    return _create_cifar_vgg('cifar_vgg16', pretrained, depth=16, **kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-19 with BN (RepDistiller ``vgg19``, i.e. ``vgg19_bn``)."""
    return _create_cifar_vgg('cifar_vgg19', pretrained, depth=19, **kwargs)
