"""Fig. 7's layer responses: which layers, and their standard deviations against a reference
that keeps every output."""

import pytest
import torch
from torch import nn

from distbelief.models import create_model
from distbelief.paper.responses import layer_responses, response_layers, sorted_stds


@pytest.mark.parametrize("name, count, first, last", [
    ("resnet20", 19, "conv1", "layer3.2.conv2"),  # the 3x3 stem and 18 block layers
    ("plain56", 55, "conv1", "layer3.8.conv2"),
    ("resnet50", 16, "layer1.0.conv2", "layer4.2.conv2"),  # a bottleneck's one 3x3; 7x7 stem
    ("resnet18", 16, "layer1.0.conv1", "layer4.1.conv2"),
])
def test_the_3x3_layers_in_forward_order(name, count, first, last):
    layers = [n for n, _ in response_layers(create_model(name))]
    assert (len(layers), layers[0], layers[-1]) == (count, first, last)


def _reference(model, batches):
    """Every BN output kept (cloned before the block adds its shortcut into it), then std."""
    outputs = {name: [] for name, _ in response_layers(model)}
    hooks = [bn.register_forward_hook(lambda m, i, o, n=name: outputs[n].append(o.clone()))
             for name, bn in response_layers(model)]
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return [torch.cat([o.flatten() for o in outs]).double().std().item()
            for outs in outputs.values()]


def test_stds_equal_a_reference_that_keeps_every_output():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    # Trained-looking BN: statistics and affine parameters away from their initial values.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.1, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    batches = [(torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    model.train()
    got = layer_responses(model, batches)
    assert model.training  # the mode is restored
    assert all(not bn._forward_hooks for _, bn in response_layers(model))  # hooks removed
    want = _reference(model, batches)
    assert [r["index"] for r in got] == list(range(1, 20))
    assert [r["std"] for r in got] == pytest.approx(want, rel=1e-9)
    assert sorted_stds(got) == pytest.approx(sorted(want, reverse=True), rel=1e-9)


def test_channels_last_gives_the_same_stds():
    torch.manual_seed(1)
    model = create_model("plain20", num_classes=10)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    plain = [r["std"] for r in layer_responses(model, batches)]
    model = model.to(memory_format=torch.channels_last)
    fast = [r["std"] for r in layer_responses(model, batches, channels_last=True)]
    assert fast == pytest.approx(plain, rel=1e-5)


def test_models_without_3x3_bn_layers_and_empty_data_are_refused():
    with pytest.raises(ValueError, match="no 3x3 convolution followed by BatchNorm"):
        layer_responses(create_model("mlp", in_chans=1, input_size=8), [])
    with pytest.raises(ValueError, match="no batches"):
        layer_responses(create_model("resnet20"), [])
