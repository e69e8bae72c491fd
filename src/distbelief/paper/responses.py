"""Layer responses (He et al., 2015, Sec. 4.2 and Fig. 7): the standard deviation of each 3x3
layer's output after its BN and before the nonlinearity or the shortcut addition, over a test
set. The paper's argument for residual functions being closer to zero than plain ones rests on
these numbers: ResNets respond less than their plain twins, and deeper ResNets less still.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from distbelief.engine.evaluate import sum_dtype


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BN) of every 3x3 convolution whose very next leaf module is a BatchNorm2d, in
    the model's registration order (for our ResNets, the forward order: stem, then each
    block's 3x3 layers). 1x1 projections and the 7x7 ImageNet stem are not 3x3 layers."""
    # Identities compute nothing (the CIFAR stem's max-pool slot sits between conv1 and bn1).
    leaves = [(name, m) for name, m in model.named_modules()
              if not list(m.children()) and not isinstance(m, nn.Identity)]
    layers = []
    for (name, conv), (_, bn) in zip(leaves, leaves[1:]):
        if (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
                and isinstance(bn, nn.BatchNorm2d)):
            layers.append((name, bn))
    return layers


class _Moments:
    """Sum, sum of squares and count of one layer's outputs, kept on the device (in float64
    where it has it) so that the whole test set is summed without a host sync per batch."""

    def __init__(self):
        self.sum = self.squares = None
        self.count = 0

    def __call__(self, module, inputs, output) -> None:
        # Reduce at once: a BasicBlock adds its shortcut into this very tensor in place.
        x = output.detach().to(sum_dtype(output.device))
        if self.sum is None:
            self.sum, self.squares = x.sum(), (x * x).sum()
        else:
            self.sum += x.sum()
            self.squares += (x * x).sum()
        self.count += x.numel()

    def std(self) -> float:
        mean = float(self.sum) / self.count
        var = float(self.squares) / self.count - mean * mean
        return max(var, 0.0) ** 0.5 * (self.count / max(self.count - 1, 1)) ** 0.5


@torch.no_grad()
def layer_responses(model: nn.Module, batches: Iterable, *,
                    channels_last: bool = False) -> list[dict]:
    """[{"index", "layer", "std"}, ...]: one entry per 3x3 layer (`response_layers`), `index`
    counting from 1 in the original order, `std` the standard deviation of all the layer's
    output values (images, channels and positions) over `batches` of (x, y), in eval mode (the
    BN statistics of training, as at test time). The model's mode is restored afterwards.

    Raises:
        ValueError: the model has no 3x3 convolution followed by BN.
    """
    layers = response_layers(model)
    if not layers:
        raise ValueError("the model has no 3x3 convolution followed by BatchNorm: no layer "
                         "responses to measure")
    moments = [_Moments() for _ in layers]
    handles = [bn.register_forward_hook(m) for (_, bn), m in zip(layers, moments)]
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if moments[0].count == 0:
        raise ValueError("no batches to measure the responses on")
    return [{"index": i + 1, "layer": name, "std": m.std()}
            for i, ((name, _), m) in enumerate(zip(layers, moments))]


def sorted_stds(responses: list[dict]) -> list[float]:
    """The stds in descending order: Fig. 7 (bottom), "sorted by magnitude"."""
    return sorted((r["std"] for r in responses), reverse=True)
