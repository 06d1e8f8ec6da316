"""Tests of the CIFAR model zoo (kdcli.models.cifar_*).

The reference numbers were computed by building RepDistiller's own definitions
(HobbitLong/RepDistiller ``models/resnet.py``, ``wrn.py``, ``vgg.py`` (the ``*_bn`` variants its
``model_dict`` uses), ``mobilenetv2.py``, ``ShuffleNetv1.py``, ``ShuffleNetv2.py``, ``resnetv2.py``)
with 100 classes; the parameter counts of the later families were also derived by hand
from the layer arithmetic, and agree.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, run_cli

# Importing the modules registers their models with timm.
import kdcli.models.cifar_mobilenetv2  # noqa: F401
import kdcli.models.cifar_resnet50  # noqa: F401
import kdcli.models.cifar_shufflenetv1  # noqa: F401
import kdcli.models.cifar_shufflenetv2  # noqa: F401
import kdcli.models.cifar_vgg  # noqa: F401
from kdcli.models._cifar_common import channel_shuffle
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
    'cifar_vgg8': (3_965_028, 37),
    'cifar_vgg11': (9_277_284, 58),
    'cifar_vgg13': (9_462_180, 72),
    'cifar_vgg16': (14_774_436, 93),
    'cifar_vgg19': (20_086_692, 114),
    'cifar_mobilenetv2': (812_836, 320),
    'cifar_shufflenetv1': (949_258, 296),
    'cifar_shufflenetv2': (1_355_528, 338),
    'cifar_resnet50': (23_705_252, 320),
}
ALL_MODELS = list(REPDISTILLER_SIZES)
# The smallest of each family and width pattern; enough for API behaviour.
SMALL_MODELS = [
    'cifar_resnet8', 'cifar_resnet8x4', 'cifar_wrn_16_1', 'cifar_wrn_16_2',
    'cifar_vgg8', 'cifar_mobilenetv2', 'cifar_shufflenetv1', 'cifar_shufflenetv2',
]
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
    'cifar_vgg13': (
        ['block0.0.weight', 'block0.0.bias', 'block0.1.running_var', 'block0.3.weight', 'block0.4.bias',
         'block4.4.num_batches_tracked', 'classifier.weight', 'classifier.bias'],
        ['block0.5.weight', 'fc.weight'],  # the block's last ReLU is applied outside it
    ),
    'cifar_mobilenetv2': (
        ['conv1.0.weight', 'conv1.1.running_mean', 'blocks.0.0.conv.0.weight', 'blocks.6.0.conv.7.bias',
         'conv2.0.weight', 'conv2.1.weight', 'classifier.0.weight', 'classifier.0.bias'],
        ['classifier.weight'],
    ),
    'cifar_shufflenetv1': (
        ['conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer1.0.bn3.bias', 'layer3.3.conv3.weight',
         'linear.weight', 'linear.bias'],
        ['layer1.0.shortcut.0.weight'],  # the stride-2 shortcut is a parameter-free average pool
    ),
    'cifar_shufflenetv2': (
        ['conv1.weight', 'layer1.0.conv5.weight', 'layer1.0.bn5.running_var', 'layer2.7.conv3.weight',
         'conv2.weight', 'bn2.bias', 'linear.weight'],
        ['layer2.8.conv1.weight'],  # 1 down-sampling unit + 7 basic units
    ),
    'cifar_resnet50': (
        ['conv1.weight', 'layer1.0.shortcut.0.weight', 'layer1.0.shortcut.1.running_mean', 'layer4.2.conv3.weight',
         'linear.weight'],
        ['layer1.1.shortcut.0.weight'],
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
@torch.no_grad()
def test_pretrained_cfg_describes_cifar100_and_the_model(name: str) -> None:
    model = build(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert cfg['num_classes'] == 100
    assert cfg['mean'] == pytest.approx((0.5071, 0.4867, 0.4408))
    assert cfg['std'] == pytest.approx((0.2675, 0.2565, 0.2761))
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert isinstance(model.get_submodule(cfg['classifier']), nn.Linear)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == cfg['pool_size']


@pytest.mark.parametrize('name', [*SMALL_MODELS, 'cifar_resnet50'])
@torch.no_grad()
def test_forward_intermediates_agree_with_feature_info_and_forward(name: str) -> None:
    model = build(name, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(model.feature_info) == len(model.stage_modules) + 1
    for feature, info in zip(intermediates, model.feature_info):
        side = 16 // info['reduction']
        assert feature.shape == (2, info['num_chs'], side, side)
    assert final.shape[1] == model.num_features
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
    for got, want in zip(last_two + picked, everything[-2:] + [everything[0], everything[-1]], strict=True):
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


@pytest.mark.parametrize('name', ['cifar_mobilenetv2', 'cifar_shufflenetv2'])
@torch.no_grad()
def test_head_conv_runs_after_the_last_stage_and_norm_leaves_it_out(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 3, 16, 16)
    raw = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    assert torch.equal(normed, raw)  # the 1x1 head conv is no norm of the last stage
    assert model.forward_features(x).shape[1] == model.num_features > raw.shape[1]
    torch.testing.assert_close(model.forward_features(x), model.forward_final(raw))


def test_channel_shuffle_interleaves_the_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


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
    torch.manual_seed(0)  # the same initial weights as ``model``
    extractor = build(name, features_only=True)
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
    assert model.get_submodule(model.pretrained_cfg['first_conv']).in_channels == 1
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


@pytest.mark.parametrize(
    'name', ['cifar_resnet8', 'cifar_wrn_16_2', 'cifar_vgg8', 'cifar_mobilenetv2', 'cifar_shufflenetv1', 'cifar_shufflenetv2'],
)
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


def test_a_new_zoo_student_distills_through_the_cli(teacher_run: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    result = run_cli(
        "distill", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_shufflenetv2",
        "--epochs", 1, "--out", student, "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["method"] == "kd" and summary["teacher_arch"] == "cifar_resnet14"
    assert 0.0 <= summary["test"]["top1"] <= 1.0
    plain = timm.create_model("cifar_shufflenetv2", num_classes=10)
    plain.load_state_dict(safetensors.torch.load_file(student / "last.safetensors"))  # strict: RepDistiller's keys
