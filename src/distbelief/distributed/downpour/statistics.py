"""BatchNorm running statistics under Downpour (--bn-stats). Plain Python: no Ray here.

The server's running statistics are one moving average over the batches of all replicas,
r <- (1 - a) r + a * mu per batch (a: BatchNorm's momentum). Two ways to get there:

- ``batch`` (the default): a replica's running buffers are accumulators. After every push they
  are zeroed, so after k forward passes they hold c_k = sum_i a (1 - a)^(k-1-i) mu_i, the moving
  average of its own batches started at zero, and do not depend on the server at all. The push
  carries c_k; the shard applies r <- (1 - a)^k r + c_k, which is the moving average run over
  those k batches, whenever they arrive. No feedback: the server's average stays a contraction
  at any staleness, and with replicas in lockstep it equals the single process's average of
  the same batches.
- ``delta``: a replica starts from the server's statistics at its fetch and pushes the change
  its batches made, c = r_local - r_fetched, which the shard adds. The server then follows
  r <- r + a (mu - r_(t - tau)), a moving average with delayed feedback, stable only for
  a below about pi / (2 tau + 1): with a = 0.1, up to a staleness of about 15.

Buffers that are not BatchNorm running statistics with a momentum (num_batches_tracked, a
cumulative average's buffers, a user's own) travel as changes in both modes (retention 1).
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

MOVING = ("running_mean", "running_var")


def buffer_retention(model: torch.nn.Module) -> torch.Tensor:
    """Per buffer element, in `model.buffers()` order (`flat.FlatModel`): 1 - momentum for a
    BatchNorm's running mean and variance, 1 for every other buffer (float32, CPU)."""
    pieces = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            keep = 1.0
            if (isinstance(module, _BatchNorm) and module.momentum is not None
                    and name in MOVING):
                keep = 1.0 - module.momentum
            pieces.append(torch.full((buffer.numel(),), keep))
    return torch.cat(pieces) if pieces else torch.zeros(0)


class Retention:
    """The retention of every element of the server's vector (`FlatModel` or `BlockFlat`
    order): 1 for parameters, `buffer_retention` for buffers. Sliced (`retention[lo:hi]`),
    it gives that run as a tensor; it holds only the buffers' values (a vector of ones as long
    as a billion-parameter model would be 4 GB)."""

    def __init__(self, flat):
        self.runs, start = [], 0  # (start, end, values; None: ones)
        for block in getattr(flat, "blocks", [flat]):
            buffers = buffer_retention(block.model)
            self.runs += [(start, start + block.n_params, None),
                          (start + block.n_params, start + block.n_params + len(buffers),
                           buffers)]
            start += block.n_params + len(buffers)
        self.size = start

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, where: slice) -> torch.Tensor:
        lo, hi, _ = where.indices(self.size)
        pieces = [torch.ones(min(end, hi) - max(begin, lo)) if values is None else
                  values[max(begin, lo) - begin:min(end, hi) - begin]
                  for begin, end, values in self.runs if max(begin, lo) < min(end, hi)]
        return torch.cat(pieces) if pieces else torch.zeros(0)


def server_retention(flat) -> Retention:
    """The retention of every element of the server's vector (`Retention`)."""
    return Retention(flat)


def buffer_slice(retention: torch.Tensor, lo: int, hi: int, n_params: int) -> torch.Tensor:
    """The retention of the buffer elements of the shard owning [lo, hi) of a vector whose
    parameters end at `n_params` (what `ParameterShard` takes): a few numbers per BatchNorm
    channel, small enough to travel inline with an actor's constructor (Ray keeps a large
    argument in its object store, where a restart may no longer find it)."""
    return retention[max(lo, n_params):hi]


def fold(values: torch.Tensor, pushed: torch.Tensor, retention: torch.Tensor | None,
         passes: int) -> None:
    """The shard's side: values <- retention^passes * values + pushed, in place (just
    values += pushed without retention). `passes`: the forward passes the push covers."""
    if retention is None:
        values.add_(pushed)
        return
    values.mul_(retention.pow(passes)).add_(pushed)


class BufferSync:
    """A replica's side of its buffers (`replica.Exchange`): which are accumulators (`ema`, a
    boolean mask over the buffer elements: mode ``batch``'s moving statistics) and which
    changes travel."""

    def __init__(self, model: torch.nn.Module, mode: str):
        mask = buffer_retention(model) < 1.0
        self.ema = mask if mode == "batch" and bool(mask.any()) else None

    def installed(self, server: torch.Tensor, local: torch.Tensor | None,
                  base: torch.Tensor | None) -> torch.Tensor:
        """The buffers a replica computes with after a fetch: the server's with the changes not
        yet pushed on top; accumulators keep their value (zero before the first push)."""
        out = server.clone() if local is None else server + (local - base)
        if self.ema is not None:
            out[self.ema] = 0.0 if local is None else local[self.ema]
        return out

    def base(self, buffers: torch.Tensor) -> torch.Tensor:
        """What the next push's changes are measured from (accumulators: from zero)."""
        out = buffers.clone()
        if self.ema is not None:
            out[self.ema] = 0.0
        return out
