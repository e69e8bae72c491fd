"""Parameter and multiply-add counts, measured on the model itself rather than read from a table."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distbelief.errors import ConfigError
from distbelief.models.registry import create_model, model_info


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one `in_chans` x `input_size`^2 image.

    Counted by torch's FlopCounterMode, which traces the convolutions and matrix products that
    actually run (2 FLOPs per multiply-add). BN, ReLU, pooling and shortcut additions are not
    counted, as in the paper's figures. Works on models built on the meta device, so no memory
    or compute is spent on real weights. The model runs in eval mode, so its BN statistics are
    left untouched, and comes back in the mode it was in.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(name: str, input_size: int | None = None, **kwargs) -> dict:
    """One row of `distbelief models`: name, family, depth, residual, params, macs, input_size.

    The model is built on the meta device, so even ResNet-152 takes a fraction of a second
    (ResNet-1202 a few seconds: rows are kept, so a process measures each model once).
    `input_size` defaults to the family's native size; `kwargs` go to `create_model`.
    """
    return dict(_summary(name, input_size, tuple(sorted(kwargs.items()))))


@functools.lru_cache(maxsize=256)
def _summary(name: str, input_size: int | None, options: tuple) -> dict:
    info = model_info(name)
    size = info.input_size if input_size is None else input_size
    if size < 1:
        raise ConfigError(f"input size must be a positive number of pixels, got {size}")
    kwargs = dict(options)
    if info.sized:
        kwargs = {**kwargs, "input_size": size}
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return {
        "name": name,
        "family": info.family,
        "depth": info.depth,
        "residual": info.residual,
        "params": count_params(model),
        "macs": count_macs(model, size, kwargs.get("in_chans", 3)),
        "input_size": size,
        "description": info.description,
    }
