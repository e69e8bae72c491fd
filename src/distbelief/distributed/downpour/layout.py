"""Where each parameter-server shard's slice lies in the server's vector, and the vector a run
starts from. No Ray here.

- An unpartitioned replica: the model's [parameters; buffers] (`flat.FlatModel`), cut into
  contiguous slices balanced by size (`optim.shard_bounds`).
- Partitioned replicas (--partitions P, Dean et al., 2012, Fig. 2): the parts' blocks one
  after the other (`flat.BlockFlat`), with every shard inside one part's block
  (`aligned_shards`), so each partition talks only to the shards that hold its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distbelief.distributed.downpour.replica import initial_model
from distbelief.distributed.downpour.statistics import server_retention
from distbelief.distributed.flat import BlockFlat, FlatModel
from distbelief.distributed.pipeline.partition import Plan, partition
from distbelief.errors import CheckpointError, ConfigError
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


def server_layout(config, data, saved: dict | None = None
                  ) -> tuple[torch.Tensor, Plan, list[ShardSlot], torch.Tensor]:
    """A partitioned Downpour run's start: (the initial server vector, the plan, the shards'
    slots, the vector's `statistics.server_retention`). The model is initialized as the
    single-process trainer initializes it (`replica.initial_model`), cut by the partitioner
    (measured on one training example) and laid out part after part (`flat.BlockFlat`); the
    shards are aligned to the parts (`aligned_shards`).

    Raises:
        ConfigError: the model cannot be cut so, or fewer shards than parts.
        CheckpointError: `saved` (the state a run resumes from) was cut elsewhere."""
    model = initial_model(config, data)
    sample = next(data.train.batches(0))[0][:1]
    plan = partition(model, config.cluster.partitions, sample)
    if saved is not None and saved.get("partition_bounds") not in (None, plan.bounds):
        raise CheckpointError(f"the run's model was cut at units {saved['partition_bounds']}, "
                              f"this one at {plan.bounds}: the shards' snapshots do not fit")
    flat = BlockFlat(plan.modules_of(model))
    slots = aligned_shards([(b.n_params, b.n_buffers) for b in flat.blocks],
                           config.cluster.ps_shards)
    vector, retention = flat.vector(), server_retention(flat)
    model.to("meta")  # the plan keeps the parts' modules: free their values (now the vector's)
    return vector, plan, slots, retention
