"""Every registered model builds, runs forward and backward, and has the paper's structure."""

import operator

import pytest
import torch
import torch.fx
from torch import nn

from distbelief import ConfigError
from distbelief.models import (BasicBlock, Bottleneck, create_model, list_models, model_info)
from distbelief.models.resnet import PadShortcut

ALL = list_models()


def small_input(name, batch=2, in_chans=3):
    # ImageNet models at 64 px keep the test fast; layer4 is then 2x2, enough for training BN.
    size = 64 if model_info(name).family == "imagenet" else 32
    return torch.randn(batch, in_chans, size, size)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def count_additions(model, x):
    """Tensor additions in the traced graph: the shortcut sums are the only ones in these nets."""
    graph = torch.fx.symbolic_trace(model).graph
    adds = {operator.add, operator.iadd, torch.add}
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in adds)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    model = create_model(name, num_classes=7)
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ALL)
def test_depth_counts_weighted_layers(name):
    """The name's depth is the number of convs and fc layers on the main path (not projections)."""
    model = create_model(name)
    projections = {id(b.downsample[0]) for b in blocks(model)
                   if isinstance(b.downsample, nn.Sequential)}
    weighted = [m for m in model.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in projections]
    assert len(weighted) == model_info(name).depth


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("plain")])
def test_plain_twins_have_no_shortcuts(name):
    twin = name.replace("plain", "resnet")
    plain, resnet = create_model(name), create_model(twin)
    x = small_input(name, batch=1)
    assert count_additions(plain, x) == 0
    assert count_additions(resnet, x) == len(blocks(resnet))
    assert not any(b.residual or b.downsample is not None for b in blocks(plain))
    if model_info(name).family == "cifar":
        # Option A adds no parameters, so the twins are the same size (Sec. 4.2).
        assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in resnet.parameters())


@pytest.mark.parametrize("name", [n for n in ALL if model_info(n).family == "dense"])
def test_dense_models_have_no_batchnorm_and_take_the_input_size(name):
    model = create_model(name, num_classes=4, in_chans=1, input_size=(8, 6))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not model_info(name).residual and model_info(name).sized
    assert model(torch.randn(3, 1, 8, 6)).shape == (3, 4)
    with pytest.raises(RuntimeError):  # built for 8x6: another size is a shape error
        model(torch.randn(3, 1, 8, 8))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_shortcut_options(name):
    models = {opt: create_model(name, shortcut=opt) for opt in "ABC"}
    n_blocks = len(blocks(models["A"]))
    projections = {opt: sum(isinstance(b.downsample, nn.Sequential) for b in blocks(m))
                   for opt, m in models.items()}
    params = {opt: sum(p.numel() for p in m.parameters()) for opt, m in models.items()}
    # A: no projection at all; B: only where dimensions grow; C: on every block.
    growing = sum(1 for b in blocks(models["A"]) if isinstance(b.downsample, PadShortcut))
    assert projections == {"A": 0, "B": growing, "C": n_blocks}
    assert params["A"] < params["B"] < params["C"]


def test_option_a_pads_zero_channels_and_subsamples():
    shortcut = PadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert not y[:, 16:].any()


def test_bottleneck_variant_moves_the_stride():
    paper = create_model("resnet50").layer2[0]
    v15 = create_model("resnet50", variant="v1.5").layer2[0]
    assert (paper.conv1.stride, paper.conv2.stride) == ((2, 2), (1, 1))
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))


@pytest.mark.parametrize("size", [8, 11, 28])
def test_cifar_models_accept_small_inputs(size):
    """8x8 single-channel digits must train: every size from 8 px up works."""
    model = create_model("resnet20", in_chans=1, num_classes=10)
    out = model(torch.randn(4, 1, size, size))
    assert out.shape == (4, 10)
    out.sum().backward()


def test_he_init_and_zero_init_residual():
    model = create_model("resnet56")
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * 3 * 3
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    zeroed = create_model("resnet50", zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in blocks(zeroed))
    assert create_model("resnet20", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0


def test_stages_compose_to_forward():
    for name in ["resnet20", "resnet50"]:
        model = create_model(name).eval()
        x = small_input(name)
        stages = model.stages()
        assert [n for n, _ in stages] == ["stem", *model.stage_names, "head"]
        y = x
        for _, stage in stages:
            y = stage(y)
        assert torch.equal(y, model(x))
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        # The pieces share the model's parameters instead of copying them.
        assert sum(p.numel() for _, s in stages for p in s.parameters()) == \
            sum(p.numel() for p in model.parameters())


def test_channels_last_matches_contiguous():
    model = create_model("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="unknown model 'resnet21'.*resnet20.*plain34"):
        create_model("resnet21")


@pytest.mark.parametrize("kwargs, match", [
    ({"shortcut": "D"}, "invalid shortcut option 'D'; choose one of: 'A', 'B', 'C'"),
    ({"variant": "v2"}, "invalid bottleneck variant 'v2'; choose one of: 'paper', 'v1.5'"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"in_chans": -1}, "in_chans must be a positive integer"),
    ({"dropout": 0.5}, "unexpected keyword argument 'dropout'"),
])
def test_invalid_options_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("resnet20", **kwargs)


def test_zero_init_residual_refused_for_plain_nets():
    with pytest.raises(ConfigError, match="zero_init_residual needs shortcuts"):
        create_model("plain20", zero_init_residual=True)


def test_trains_on_8x8_single_channel_images():
    """Small real datasets such as 8x8 digits must train: a 10-class 8x8 task in 100 steps.

    Each class is a fixed random 8x8 template under Gaussian noise; held-out accuracy must go
    from chance to at least 95% (seeds 0-4 all reached 100%). The plain twin is left out on
    purpose: at lr 0.1 it sometimes stalls (42% on one seed), which is the paper's optimization
    difficulty of plain nets, not a matter of input size.
    """
    templates = torch.randn(10, 1, 8, 8)

    def sample(n):
        y = torch.randint(0, 10, (n,))
        return templates[y] + 0.5 * torch.randn(n, 1, 8, 8), y

    x_train, y_train = sample(1024)
    x_test, y_test = sample(512)
    model = create_model("resnet20", in_chans=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(100):
        idx = torch.randint(0, len(x_train), (64,))
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.95
