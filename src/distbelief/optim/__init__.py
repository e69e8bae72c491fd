"""Optimizer math on flat parameter vectors, shared by the single-process trainer's parity tests
and the parameter-server shards.

Every function updates its tensors in place and matches the corresponding `torch.optim` step
operation for operation, so that one Downpour replica on any number of shards reproduces the
single-process trainer (tests/parity/test_update_rules.py, tests/parity/test_downpour.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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


CHUNK = 1 << 16  # elements per pass of a fused update: its working set stays in L2 cache


def chunks(n: int, chunk: int = CHUNK):
    """[lo, hi) ranges of at most `chunk` elements covering [0, n)."""
    return ((lo, min(lo + chunk, n)) for lo in range(0, n, chunk))


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) as at most `parts` contiguous ranges, each starting at a multiple of CHUNK, none
    empty."""
    cuts = sorted({min(n, round(n * k / parts / CHUNK) * CHUNK) for k in range(1, parts)})
    edges = [0, *[c for c in cuts if 0 < c < n], n]
    return list(zip(edges[:-1], edges[1:]))


class Ranges:
    """Runs an elementwise operation `fn(lo, hi)` over [0, n) on `threads` threads, each on a
    contiguous range (`split`). Python threads, not torch's: torch's elementwise kernels release
    the GIL, and threads that block, unlike torch's OpenMP workers, which spin while they wait,
    cost nothing when the cores are busy elsewhere (a chunked 100 MB update on 2 OpenMP threads,
    next to a training run on both cores, took over 100 times longer than on one thread)."""

    def __init__(self, threads: int = 1):
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def run(self, n: int, fn) -> list:
        """[fn(lo, hi) for each range], in order; the calling thread takes the first range."""
        ranges = split(n, self.threads) if self.pool is not None and n > CHUNK else [(0, n)]
        futures = [self.pool.submit(fn, lo, hi) for lo, hi in ranges[1:]]
        first = fn(*ranges[0])
        return [first, *(f.result() for f in futures)]


@torch.no_grad()
def sgd_update(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, lr: float,
               momentum: float, weight_decay: float, nesterov: bool,
               fresh: bool = False) -> torch.Tensor | None:
    """One SGD step on w (n,) with gradient g (n,, any float dtype); v (n,) is the momentum
    buffer, None before the first step (or storage to fill, with `fresh`). Returns the buffer.
    As torch.optim.SGD (dampening 0), with the same operations on every element:
        d = g + weight_decay * w
        v = d (first step) or momentum * v + d
        w -= lr * (d + momentum * v if nesterov else v)
    Fused: the vectors are walked in L2-sized chunks, every operation done on a chunk before
    the next is read, so w, v and g each cross memory once (unfused, the five operations were
    five passes over vectors of up to 100 MB) and nothing is allocated but one chunk."""
    first = v is None or fresh
    if momentum and v is None:
        v = torch.empty_like(w)
    scratch = torch.empty(min(CHUNK, w.numel())) if weight_decay or nesterov else None
    for lo, hi in chunks(w.numel()):
        wc, gc = w[lo:hi], g[lo:hi]
        d = torch.add(gc, wc, alpha=weight_decay, out=scratch[:hi - lo]) if weight_decay else gc
        if momentum:
            vc = v[lo:hi]
            if first:
                vc.copy_(d)
            else:
                vc.mul_(momentum).add_(d)
            d = torch.add(d, vc, alpha=momentum, out=scratch[:hi - lo]) if nesterov else vc
        wc.add_(d, alpha=-lr)
    return v


@torch.no_grad()
def adagrad_update(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, gamma: float,
                   weight_decay: float, eps: float = ADAGRAD_EPS) -> None:
    """One Adagrad step (Duchi et al.; DistBelief Sec. 4.1): per parameter i,
        h_i += g_i^2,   w_i -= gamma * g_i / (sqrt(h_i) + eps)
    i.e. eta_i = gamma / sqrt(sum of squared gradients so far). h (n,) starts at zero.
    Weight decay is added to the gradient first, as torch.optim.Adagrad does. Fused in chunks,
    as `sgd_update`."""
    scratch = torch.empty(min(CHUNK, w.numel()))
    decayed = torch.empty(min(CHUNK, w.numel())) if weight_decay else None
    for lo, hi in chunks(w.numel()):
        wc, gc, hc = w[lo:hi], g[lo:hi], h[lo:hi]
        if weight_decay:
            gc = torch.add(gc, wc, alpha=weight_decay, out=decayed[:hi - lo])
        hc.addcmul_(gc, gc, value=1)
        root = torch.sqrt(hc, out=scratch[:hi - lo]).add_(eps)
        wc.addcdiv_(gc, root, value=-gamma)


__all__ = ["shard_bounds", "sgd_update", "adagrad_update", "chunks", "split", "Ranges", "CHUNK",
           "ADAGRAD_EPS"]
