"""Tests of the CIFAR model zoo (kdcli.models.cifar_resnet, kdcli.models.cifar_wrn).

The reference numbers were computed by building RepDistiller's own definitions
(HobbitLong/RepDistiller ``models/resnet.py``, ``models/wrn.py``) with 100 classes.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

# Importing the modules registers their models with timm.
from kdcli.models.cifar_resnet import BasicBlock
from kdcli.models.cifar_wrn import WideBasicBlock

# name -> (parameter count, state_dict entry count) of RepDistiller's model, 100 classes.
REPDISTILLER_SIZES: dict[str, tuple[int, int]] = {
    'cifar_resnet8': (83_892, 56),
    'cifar_resnet14': (181_108, 92),
    'cifar_resnet20': (278_324, 128),
    'cifar_resnet32': (472_756, 200),
    'cifar_resnet44': (667_188, 272),
    'cifar_resnet56': (861_620, 344),
    'cifar_resnet110': (1_736_564, 668),
    'cifar_resnet8x4': (1_233_540, 62),
    'cifar_resnet32x4': (7_433_860, 206),
    'cifar_wrn_16_1': (180_916, 82),
    'cifar_wrn_16_2': (703_284, 83),
    'cifar_wrn_40_1': (569_780, 226),
    'cifar_wrn_40_2': (2_255_156, 227),
}
ALL_MODELS = list(REPDISTILLER_SIZES)
# The smallest of each family and width pattern; enough for API behaviour.
SMALL_MODELS = ['cifar_resnet8', 'cifar_resnet8x4', 'cifar_wrn_16_1', 'cifar_wrn_16_2']
SMALL_WRNS = ['cifar_wrn_16_1', 'cifar_wrn_16_2']

# name -> (keys RepDistiller's state_dict has, keys it does not have)
REPDISTILLER_KEYS: dict[str, tuple[list[str], list[str]]] = {
    'cifar_resnet8': (
        ['conv1.weight', 'bn1.running_mean', 'layer1.0.conv1.weight', 'layer1.0.bn2.bias',
         'layer2.0.downsample.0.weight', 'layer3.0.downsample.1.running_var', 'fc.weight', 'fc.bias'],
        ['layer1.0.downsample.0.weight'],  # 16 -> 16 channels at stride 1: identity shortcut
    ),
    'cifar_resnet8x4': (
        ['conv1.weight', 'bn1.weight', 'layer1.0.downsample.0.weight', 'layer1.0.downsample.1.num_batches_tracked',
         'layer3.0.conv2.weight', 'fc.weight'],
        [],
    ),
    'cifar_wrn_16_1': (
        ['conv1.weight', 'block1.layer.0.bn1.weight', 'block1.layer.1.conv2.weight',
         'block2.layer.0.convShortcut.weight', 'block3.layer.1.bn2.running_var', 'bn1.weight', 'fc.bias'],
        ['block1.layer.0.convShortcut.weight'],  # 16 -> 16 channels: identity shortcut
    ),
    'cifar_wrn_40_2': (
        ['conv1.weight', 'block1.layer.0.convShortcut.weight', 'block3.layer.5.conv2.weight',
         'bn1.running_mean', 'fc.weight'],
        ['block1.layer.1.convShortcut.weight'],
    ),
}


@pytest.fixture(scope='module', autouse=True)
def _single_thread() -> Iterator[None]:
    # The tensors are tiny: intra-op threads only add overhead, and on a busy machine
    # their spin-waiting slows these tests down tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def build(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **kwargs).eval()


def test_registry_lists_the_whole_zoo() -> None:
    assert sorted(timm.list_models('cifar_*')) == sorted(ALL_MODELS)


@pytest.mark.parametrize('name', ALL_MODELS)
@torch.no_grad()
def test_classifies_cifar_and_small_inputs(name: str) -> None:
    model = build(name, num_classes=10)
    for size in (32, 16):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_sizes_match_repdistiller(name: str) -> None:
    model = build(name)  # default head: CIFAR-100
    num_params, num_entries = REPDISTILLER_SIZES[name]
    assert model.num_classes == 100
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert len(model.state_dict()) == num_entries


@pytest.mark.parametrize('name', list(REPDISTILLER_KEYS))
def test_state_dict_uses_repdistiller_key_names(name: str) -> None:
    present, absent = REPDISTILLER_KEYS[name]
    keys = set(build(name).state_dict())
    assert set(present) <= keys
    assert not set(absent) & keys


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pretrained_cfg_describes_cifar100(name: str) -> None:
    cfg = build(name).pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert cfg['num_classes'] == 100
    assert cfg['mean'] == pytest.approx((0.5071, 0.4867, 0.4408))
    assert cfg['std'] == pytest.approx((0.2675, 0.2565, 0.2761))


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_forward_intermediates_agree_with_feature_info_and_forward(name: str) -> None:
    model = build(name, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(model.feature_info) == 4
    for feature, info in zip(intermediates, model.feature_info):
        side = 16 // info['reduction']
        assert feature.shape == (2, info['num_chs'], side, side)
    assert model.feature_info[-1]['num_chs'] == model.num_features
    assert torch.equal(final, model.forward_features(x))
    torch.testing.assert_close(model.forward_head(final), model(x))


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_forward_intermediates_index_selection(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 16, 16)
    everything = model.forward_intermediates(x, intermediates_only=True)
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    for got, want in zip(last_two + picked, everything[2:] + everything[0::3]):
        assert torch.equal(got, want)

    final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(early[0], everything[1])
    assert torch.equal(final, everything[1])  # stopped after stage 1


@pytest.mark.parametrize('name', SMALL_WRNS)
@torch.no_grad()
def test_wrn_norm_takes_last_stage_after_final_bn_relu(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 16, 16)
    raw = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(normed, F.relu(model.bn1(raw)))
    torch.testing.assert_close(normed, model.forward_features(x))
    assert raw.min() < 0  # pre-activation: the raw stage output is not yet through a ReLU


@pytest.mark.parametrize('name', ['cifar_resnet8', 'cifar_wrn_16_2'])
@torch.no_grad()
def test_pooling_at_32x32_equals_repdistiller_avgpool8(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape[-2:] == (8, 8)
    torch.testing.assert_close(model(x), model.fc(F.avg_pool2d(features, 8).flatten(1)))


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_features_only_returns_the_stage_features(name: str) -> None:
    model = build(name)
    extractor = build(name, features_only=True)
    extractor.load_state_dict(model.state_dict(), strict=False)  # the extractor lacks the head
    x = torch.randn(2, 3, 16, 16)
    features = extractor(x)
    assert extractor.feature_info.channels() == [info['num_chs'] for info in model.feature_info]
    for got, want in zip(features, model.forward_intermediates(x, intermediates_only=True), strict=True):
        assert torch.equal(got, want)
    assert len(build(name, features_only=True, out_indices=(1, 3))(x)) == 2


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_single_channel_input_and_img_size_kwarg(name: str) -> None:
    model = build(name, in_chans=1, num_classes=10, img_size=64)  # img_size is ignored
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_reset_classifier(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 16, 16)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize('name', SMALL_MODELS)
@torch.no_grad()
def test_prune_intermediate_layers_keeps_requested_stages(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 16, 16)
    wanted = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    for got, want in zip(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True), wanted):
        assert torch.equal(got, want)
    assert model.num_features == model.feature_info[1]['num_chs']
    assert torch.equal(model.forward_features(x), wanted[1])


@pytest.mark.parametrize('name', ['cifar_resnet8', 'cifar_wrn_16_2'])
def test_trains(name: str) -> None:
    model = build(name, num_classes=10).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()  # also guards the in-place ReLUs against autograd errors
    assert all(p.grad is not None for p in model.parameters())


def test_resnet_block_is_post_activation() -> None:
    block = BasicBlock(16, 32, stride=2).eval()
    nn.init.zeros_(block.bn2.weight)  # residual branch -> 0, leaving relu(shortcut(x))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(block.downsample(x)))


def test_wrn_shortcuts_follow_repdistiller() -> None:
    # Projection shortcuts read the pre-activated input, identity shortcuts the raw input.
    projecting = WideBasicBlock(16, 32, stride=2).eval()
    identity = WideBasicBlock(32, 32).eval()
    for block in (projecting, identity):
        nn.init.zeros_(block.conv2.weight)  # residual branch -> 0
    x = torch.randn(2, 16, 8, 8)
    y = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(projecting(x), projecting.convShortcut(F.relu(projecting.bn1(x))))
        torch.testing.assert_close(identity(y), y)
