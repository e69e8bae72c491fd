"""Models without BatchNorm for smooth objectives: softmax regression and a small MLP; and a
deep wide MLP, large enough at --hidden 16384 (1.07B parameters) to need model parallelism.

Sandblaster L-BFGS (Dean et al., 2012) optimizes one deterministic batch objective per
iteration; these models make that objective a smooth function of the parameters alone (no
batch statistics), so L-BFGS can be checked against a reference optimizer. Both flatten the
image, so they are built for one input size (`input_size`, a side or (height, width)).
"""

from __future__ import annotations

from torch import nn

from distbelief.models.init import seeded
from distbelief.models.registry import register_model


def _features(in_chans: int, input_size) -> int:
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if min(in_chans, h, w) < 1:
        raise ValueError(f"input of {in_chans} x {h} x {w} has no pixels")
    return in_chans * h * w


@register_model("dense", depth=1)
def softmax(num_classes: int = 10, in_chans: int = 3, input_size=32) -> nn.Module:
    """Softmax regression: one linear layer on the flattened image (a convex objective)."""
    features = _features(in_chans, input_size)
    return seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes)))


@register_model("dense", depth=2)
def mlp(num_classes: int = 10, in_chans: int = 3, input_size=32, hidden: int = 256) -> nn.Module:
    """Multilayer perceptron: flattened image, one tanh hidden layer of `hidden` units."""
    features = _features(in_chans, input_size)
    return seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.Tanh(),
                                        nn.Linear(hidden, num_classes)))


def he_linear(unit: nn.Module, name: str, module: nn.Module) -> None:
    """A deep ReLU MLP's start: each linear layer's weights by He et al. (2015, "Delving deep";
    fan_in, ReLU gain: the activations keep their scale through the layers, where torch's own
    initialization shrinks them about 2.4x per layer), biases at zero."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)


@register_model("dense", depth=6)
def deep_mlp(num_classes: int = 10, in_chans: int = 3, input_size=32,
             hidden: int = 1024) -> nn.Module:
    """Deep wide MLP: five ReLU layers of `hidden` units (--hidden 16384: 1.07B parameters)."""
    features = _features(in_chans, input_size)

    def construct() -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()]
        width = features
        for _ in range(5):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(*layers, nn.Linear(width, num_classes))

    return seeded(construct, he_linear)
