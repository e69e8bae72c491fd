"""Where each parameter-server shard's slice lies in the server's vector, and the vector a run
starts from. No Ray here.

- An unpartitioned replica: the model's [parameters; buffers] (`flat.FlatModel`), cut into
  contiguous slices balanced by size (`optim.shard_bounds`).
- Partitioned replicas (--partitions P, Dean et al., 2012, Fig. 2): the parts' blocks one
  after the other (`flat.BlockFlat`), with every shard inside one part's block
  (`aligned_shards`), so each partition talks only to the shards that hold its parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from distbelief.distributed.downpour.replica import initial_model
from distbelief.distributed.downpour.statistics import server_retention
from distbelief.distributed.flat import BlockFlat, FlatModel
from distbelief.distributed.pipeline.partition import Plan, partition
from distbelief.engine.setup import build_model
from distbelief.errors import CheckpointError, ConfigError
from distbelief.models.init import materialize
from distbelief.optim import shard_bounds


@dataclass(frozen=True)
class ShardSlot:
    """Where parameter-server shard k lies in the server vector: w[lo:hi) inside part `part`'s
    block (part 0, the whole vector, when the replicas are not partitioned), whose parameters
    end at `param_end` (buffers follow)."""

    part: int
    lo: int
    hi: int
    param_end: int


def aligned_shards(blocks: list[tuple[int, int]], shards: int) -> list[ShardSlot]:
    """`shards` shards over parts whose blocks hold (parameters, buffers) elements: every part
    with values gets at least one shard and the rest go by size (largest remainder), and no
    shard straddles two parts; within a part its shards are balanced by size
    (`optim.shard_bounds`). A part without values (a flatten, an activation) gets none.

    Raises:
        ConfigError: fewer shards than parts with values."""
    sizes = [p + b for p, b in blocks]
    owners = [i for i, size in enumerate(sizes) if size]
    if shards < len(owners):
        raise ConfigError(f"--ps-shards {shards} is below the {len(owners)} partitions with "
                          f"parameters: every partition talks to shards of its own")
    extra = shards - len(owners)
    share = {i: extra * sizes[i] / sum(sizes) for i in owners}
    counts = {i: min(1 + int(x), sizes[i]) for i, x in share.items()}  # a shard holds >= 1
    by_remainder = sorted(owners, key=lambda i: int(share[i]) - share[i])
    while sum(counts.values()) < shards:
        room = [i for i in by_remainder if counts[i] < sizes[i]]
        if not room:
            raise ConfigError(f"--ps-shards {shards} exceeds the model's {sum(sizes)} values")
        for i in room[:shards - sum(counts.values())]:
            counts[i] += 1
    slots, offset = [], 0
    for part, ((n_params, _), size) in enumerate(zip(blocks, sizes)):
        if size:
            slots.extend(ShardSlot(part, offset + lo, offset + hi, offset + n_params)
                         for lo, hi in shard_bounds(size, counts[part]))
        offset += size
    return slots


def plain_layout(config, data) -> tuple[torch.Tensor, list[ShardSlot], torch.Tensor]:
    """An unpartitioned run's start: (the initial server vector, the shards' slots, the
    vector's `statistics.server_retention`). The model is initialized as the single-process
    trainer initializes it (`replica.initial_model`)."""
    flat = FlatModel(initial_model(config, data))
    vector = flat.vector()
    return vector, [ShardSlot(0, lo, hi, flat.n_params)
                    for lo, hi in shard_bounds(vector.numel(), config.cluster.ps_shards)], \
        server_retention(flat)


class PartSlice:
    """The initial values of a shard's slice, [lo, hi) of its part's block, computed by the
    process that calls `values` (the shard) from the part alone: the part travels built on the
    meta device (a few bytes) and is materialized and initialized by name (`models.init`) with
    the whole model's seed, so no process ever holds more of the model than one part."""

    def __init__(self, module: torch.nn.Module, names: list[str], seed: int, rule,
                 lo: int, hi: int):
        self.module, self.names, self.seed, self.rule = module, names, seed, rule
        self.lo, self.hi = lo, hi

    def values(self) -> np.ndarray:
        """[lo, hi) of the part's [parameters; buffers], float32: only the tensors that
        overlap it are copied (the part itself is freed on return)."""
        part = FlatModel(materialize(copy.deepcopy(self.module), self.names, self.seed,
                                     self.rule))
        out, start = np.empty(self.hi - self.lo, np.float32), 0
        for tensor in part.params + part.buffers:
            end = start + tensor.numel()
            lo, hi = max(start, self.lo), min(end, self.hi)
            if lo < hi:
                flat = tensor.detach().reshape(-1)[lo - start:hi - start]
                out[lo - self.lo:hi - self.lo] = flat.float().numpy()
            start = end
        return out


def start_values(start: np.ndarray | PartSlice) -> np.ndarray:
    """A shard's initial values from its start (`server_layout`): the array, or computed."""
    return start.values() if isinstance(start, PartSlice) else start


def server_layout(config, data, saved: dict | None = None) -> tuple[list, Plan, list[ShardSlot],
                                                                     torch.Tensor]:
    """A partitioned Downpour run's start: (each shard's initial values, the plan, the shards'
    slots, the vector's `statistics.server_retention`). The model is initialized as the
    single-process trainer initializes it (`replica.initial_model`), cut by the partitioner
    (measured on one training example) and laid out part after part (`flat.BlockFlat`); the
    shards are aligned to the parts (`aligned_shards`).

    A registry model is built on the meta device only: each shard's start is a `PartSlice`,
    computed by the shard. A model given to `distbelief.fit` or loaded by --init-from is built
    here whole, and each start is an array.

    Raises:
        ConfigError: the model cannot be cut so, or fewer shards than parts.
        CheckpointError: `saved` (the state a run resumes from) was cut elsewhere."""
    sample = next(data.train.batches(0))[0][:1]
    sharded = config.init_from is None and config.user is None
    if sharded:
        torch.manual_seed(config.seed)  # as `initial_model`: the same seed is drawn
        with torch.device("meta"):
            model = build_model(config, data)
        sample = sample.to("meta")
    else:
        model = initial_model(config, data)
    plan = partition(model, config.cluster.partitions, sample, config.cluster.partition_at)
    if saved is not None and saved.get("partition_bounds") not in (None, plan.bounds):
        raise CheckpointError(f"the run's model was cut at units {saved['partition_bounds']}, "
                              f"this one at {plan.bounds}: the shards' snapshots do not fit")
    flat = BlockFlat(plan.modules_of(model))
    slots = aligned_shards([(b.n_params, b.n_buffers) for b in flat.blocks],
                           config.cluster.ps_shards)
    offsets = np.cumsum([0, *flat.sizes]).tolist()
    if sharded:
        starts = [PartSlice(plan.parts[s.part].module, plan.parts[s.part].names,
                            model.init_seed, model.init_rule, s.lo - offsets[s.part],
                            s.hi - offsets[s.part]) for s in slots]
    else:
        vector = flat.vector()
        starts = [vector[s.lo:s.hi].numpy() for s in slots]
        model.to("meta")  # the plan keeps the parts' modules: free their values (now `starts`)
    return starts, plan, slots, server_retention(flat)
