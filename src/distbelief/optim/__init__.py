"""Optimizer math on flat parameter vectors, shared by the single-process trainer's parity tests
and the parameter-server shards.

Every function updates its tensors in place and matches the corresponding `torch.optim` step
operation for operation, so that one Downpour replica on any number of shards reproduces the
single-process trainer (tests/parity/test_update_rules.py, tests/parity/test_downpour.py).
"""

from __future__ import annotations

import torch

ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default


def shard_bounds(total: int, shards: int) -> list[tuple[int, int]]:
    """Cut a flat vector of `total` elements into `shards` contiguous [lo, hi) slices whose sizes
    differ by at most one element (balanced by size, as the paper's "each shard holds a tenth")."""
    if not 1 <= shards <= total:
        raise ValueError(f"cannot cut {total} elements into {shards} shards")
    base, extra = divmod(total, shards)
    bounds, lo = [], 0
    for k in range(shards):
        hi = lo + base + (k < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@torch.no_grad()
def sgd_update(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, lr: float,
               momentum: float, weight_decay: float, nesterov: bool) -> torch.Tensor | None:
    """One SGD step on w (n,) with gradient g (n,); v (n,) is the momentum buffer, None before
    the first step. Returns the new buffer. As torch.optim.SGD (dampening 0):
        d = g + weight_decay * w
        v = d (first step) or momentum * v + d
        w -= lr * (d + momentum * v if nesterov else v)
    """
    d = g.add(w, alpha=weight_decay) if weight_decay else g
    if momentum:
        if v is None:
            v = d.clone()
        else:
            v.mul_(momentum).add_(d)
        d = d.add(v, alpha=momentum) if nesterov else v
    w.add_(d, alpha=-lr)
    return v


@torch.no_grad()
def adagrad_update(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, gamma: float,
                   weight_decay: float, eps: float = ADAGRAD_EPS) -> None:
    """One Adagrad step (Duchi et al.; DistBelief Sec. 4.1): per parameter i,
        h_i += g_i^2,   w_i -= gamma * g_i / (sqrt(h_i) + eps)
    i.e. eta_i = gamma / sqrt(sum of squared gradients so far). h (n,) starts at zero.
    Weight decay is added to the gradient first, as torch.optim.Adagrad does."""
    if weight_decay:
        g = g.add(w, alpha=weight_decay)
    h.addcmul_(g, g, value=1)
    w.addcdiv_(g, h.sqrt().add_(eps), value=-gamma)


__all__ = ["shard_bounds", "sgd_update", "adagrad_update", "ADAGRAD_EPS"]
