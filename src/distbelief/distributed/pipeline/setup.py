"""The Downpour driver's side of partitioned replicas: the server's layout over the parts,
starting the partition actors and the replicas' heads, and the summary's per-partition
entries. The driver (`downpour.driver`) calls these when --partitions is above 1."""

from __future__ import annotations

import torch

from distbelief.distributed.downpour.records import mean_staleness, staleness
from distbelief.distributed.downpour.replica import initial_model
from distbelief.distributed.flat import BlockFlat
from distbelief.distributed.pipeline.actors import PartitionedReplicaActor, StageActor
from distbelief.distributed.pipeline.partition import Plan, ShardSlot, aligned_shards, partition
from distbelief.distributed.runtime import replica_options
from distbelief.engine.setup import build_model
from distbelief.errors import CheckpointError


def server_layout(config, data, saved: dict | None = None):
    """A partitioned Downpour run's start: (the initial server vector, the plan, the shards'
    slots). The model is initialized as the single-process trainer initializes it
    (`downpour.replica.initial_model`), cut by the partitioner (measured on one training
    example) and laid out part after part (`flat.BlockFlat`); the shards are aligned to the
    parts (`partition.aligned_shards`).

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
    vector = flat.vector()
    model.to("meta")  # the plan keeps the parts' modules: free their values (now the vector's)
    return vector, plan, slots


def start_partitioned(session, config, plan: Plan, slots: list[ShardSlot],
                      shard_names: list[str], data):
    """Start R x P partition actors (each reaching only the shards of its part) and R heads
    into `session` (`session.stages`, `session.replicas`); returns the partitions' shape. The
    parts travel built on the meta device: their values come from the shards."""
    c = config
    parts, replicas = c.cluster.partitions, c.cluster.replicas
    options, shape = replica_options(c, count=replicas * parts)
    with torch.device("meta"):
        modules = plan.modules_of(build_model(c, data))
    sizes = [sum(t.numel() for t in [*m.parameters(), *m.buffers()]) for m in modules]
    offsets = [sum(sizes[:p]) for p in range(parts)]
    servers = [([shard_names[k] for k, s in enumerate(slots) if s.part == p],
                [(s.lo - offsets[p], s.hi - offsets[p]) for s in slots if s.part == p])
               for p in range(parts)]
    names = [[session.name(f"stage-{r}-{p}") for p in range(parts)] for r in range(replicas)]
    session.stages = [
        StageActor.options(name=names[r][p], **options).remote(
            p, parts, modules[p], c, shape.threads, shape.device, server=(*servers[p], r))
        for r in range(replicas) for p in range(parts)]
    session.replicas = [PartitionedReplicaActor.options(
        max_restarts=c.cluster.max_restarts, max_task_retries=0).remote(
        r, c, names[r], data.stats) for r in range(replicas)]
    return shape


def partition_summary(statuses: list[dict], slots: list[ShardSlot], parts: int) -> dict:
    """The summary's model-parallel entries: which partition each shard serves, and the mean
    staleness of each partition's pushes (measured by its shards)."""
    return {"partitions": parts, "shard_partitions": [s.part for s in slots],
            "partition_staleness_mean": [
                mean_staleness(staleness([st for st in statuses
                                          if slots[st["shard"]].part == p]))
                for p in range(parts)]}
