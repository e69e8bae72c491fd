"""A model seen as one flat vector, the form in which the parameter-server shards hold it.

The server's vector is the model's parameters followed by its buffers (BatchNorm running
statistics), each tensor in its logical (N, C, H, W) order whatever its memory format:

    [ p_0 | p_1 | ... | p_last | running_mean_0 | running_var_0 | num_batches_tracked_0 | ... ]
      <------ n_params: trained by gradients -----><------- buffers: moving averages ------->

`optim.shard_bounds` cuts it into contiguous slices, one per shard.
"""

from __future__ import annotations

import math

import torch


class FlatModel:
    """A model as the server's flat vector: [parameters; buffers] in `parameters()` then
    `buffers()` order. The tensor lists are taken once: walking the module tree per step costs
    more than the copies."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = list(model.parameters())
        self.buffers = list(model.buffers())
        self.n_params = sum(p.numel() for p in self.params)
        self.n_buffers = sum(b.numel() for b in self.buffers)
        self.sizes = [t.numel() for t in self.params + self.buffers]

    @torch.no_grad()
    def vector(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Flat CPU copy of [parameters; buffers] (float32 unless `dtype`)."""
        return torch.cat([t.reshape(-1).to(dtype).cpu() for t in self.params + self.buffers])

    @torch.no_grad()
    def load(self, vector: torch.Tensor) -> None:
        """Copy a flat [parameters; buffers] vector in (any device, memory format and float
        dtype)."""
        if vector.numel() != self.n_params + self.n_buffers:
            raise ValueError(f"vector of {vector.numel()} elements for a model of "
                             f"{self.n_params + self.n_buffers}")
        self.load_parts(vector[:self.n_params], vector[self.n_params:])

    @torch.no_grad()
    def load_parts(self, params: torch.Tensor, buffers: torch.Tensor) -> None:
        """Copy the parameters' and the buffers' flat vectors in, each straight from where it
        is (no joined copy of the two)."""
        for tensors, sizes, vector in ((self.params, self.sizes[:len(self.params)], params),
                                       (self.buffers, self.sizes[len(self.params):], buffers)):
            if not tensors:
                continue
            pieces = vector.to(tensors[0].device).split(sizes)
            # copy_ casts (num_batches_tracked is int64) and writes any memory format.
            torch._foreach_copy_(tensors, [v.view(t.shape) for v, t in zip(pieces, tensors)])

    @torch.no_grad()
    def load_buffers(self, buffers: torch.Tensor) -> None:
        """Copy a flat buffers vector in."""
        pieces = buffers.to(self.buffers[0].device).split(self.sizes[len(self.params):])
        torch._foreach_copy_(self.buffers, [v.view(t.shape) for v, t in zip(pieces, self.buffers)])

    @torch.no_grad()
    def parameter_vector(self) -> torch.Tensor:
        """Flat float32 copy of the parameters, on the model's device."""
        return torch.cat([p.reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def gradient(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Flat gradient of the parameters (zeros where one got none) on the model's device,
        float32 unless `dtype`."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.params]).to(dtype)

    @torch.no_grad()
    def buffer_vector(self) -> torch.Tensor:
        """Flat float32 CPU copy of the buffers (BatchNorm statistics)."""
        if not self.buffers:
            return torch.zeros(0)
        return torch.cat([b.reshape(-1).float() for b in self.buffers]).cpu()


def model_vector(model: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """(flat float32 CPU copy of [parameters; buffers], number of parameter elements)."""
    flat = FlatModel(model)
    return flat.vector(), flat.n_params


def load_model_vector(model: torch.nn.Module, vector: torch.Tensor) -> None:
    FlatModel(model).load(vector)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A finite sum proves it (NaN and Inf propagate) in one
    fast pass; only a sum that overflowed or is NaN needs the exact elementwise check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


class BlockFlat:
    """A partitioned model as the server's flat vector: the blocks of its parts one after the
    other, each [its parameters; its buffers] (a `FlatModel` of the part), so that every part's
    values are one contiguous run of the vector and shards can be aligned to parts. The
    interface is `FlatModel`'s where the driver needs it (`vector`, `load`)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.blocks = [FlatModel(m) for m in modules]
        self.n_params = sum(b.n_params for b in self.blocks)
        self.n_buffers = sum(b.n_buffers for b in self.blocks)
        self.sizes = [b.n_params + b.n_buffers for b in self.blocks]

    @torch.no_grad()
    def vector(self) -> torch.Tensor:
        # One concatenation of every tensor: no per-block copies on the way.
        return torch.cat([t.reshape(-1).float().cpu() for b in self.blocks
                          for t in b.params + b.buffers])

    @torch.no_grad()
    def load(self, vector: torch.Tensor) -> None:
        if vector.numel() != sum(self.sizes):
            raise ValueError(f"vector of {vector.numel()} elements for a model of "
                             f"{sum(self.sizes)}")
        for block, piece in zip(self.blocks, vector.split(self.sizes)):
            block.load(piece)
