"""Sandblaster's Ray actors: thin wrappers around `VectorShard` and `SandblasterReplica`, the
coordinator's vector store over the shard actors, and the replicas' client."""

from __future__ import annotations

import os
import uuid
import warnings

import numpy as np
import ray
import torch

from distbelief.distributed.runtime.calls import RayPending, get
from distbelief.distributed.runtime.cluster import node_id
from distbelief.distributed.runtime.snapshots import SnapshotSender
from distbelief.distributed.wire import tensor_view
from distbelief.distributed.sandblaster.replica import SandblasterReplica
from distbelief.distributed.sandblaster.shard import VectorShard, combine, snapshot_name

SHARD_LOST = ("a parameter-server shard is gone (it failed more than --max-restarts times); "
              "--resume continues from the last checkpoint")


def _commands_in(commands: list) -> list:
    return [(c[0], c[1], tensor_view(c[2])) if c[0] == "set" else c for c in commands]


@ray.remote(num_cpus=0)
class VectorShardActor:
    """A `VectorShard` (its slices of the L-BFGS vectors) in its own process. At the start of
    every iteration (`keep`) the vectors written since the last one go to the keeper on the
    driver's node; after a failure Ray re-runs the constructor, on another node if its node was
    lost, which restores them: the coordinator then rolls the other shards back to the same
    iteration (`rollback`) and repeats it."""

    def __init__(self, index: int, lo: int, hi: int, keeper_name: str):
        self.shard = VectorShard(index, lo, hi)
        self.sender = SnapshotSender(keeper_name, snapshot_name(index))
        self.incarnation = uuid.uuid4().hex
        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.restored = self.rollback() if reconstructed else None

    def execute(self, commands: list) -> list:
        return self.shard.execute(_commands_in(commands))

    def push(self, round_: int, portions: list, update: np.ndarray, solo: bool) -> str:
        return self.shard.push(round_, portions, tensor_view(update), solo)

    def pull(self, name: str = "x") -> np.ndarray:
        return self.shard.pull(name).numpy()

    def keep(self, iteration: int) -> int:
        """Send the vectors written since the last `keep` to the keeper; returns once it has
        them, so that every shard's vectors of `iteration` are there before it starts."""
        self.sender.send_now(self.shard.snapshot(iteration, delta=True))
        return iteration

    def state(self, iteration: int) -> dict:
        """All vectors, for the coordinator's checkpoint."""
        return self.shard.snapshot(iteration)

    def restore(self, state: dict) -> int:
        return self.shard.restore(state)

    def rollback(self) -> int | None:
        """Back to the vectors the keeper holds (the start of the iteration being repeated);
        returns their iteration, None when it holds none."""
        snapshot = self.sender.restore()
        return None if snapshot is None else self.shard.restore(snapshot)

    def stats(self) -> dict:
        return {**self.shard.stats(), "node": node_id(), "incarnation": self.incarnation}


class RayShards:
    """The coordinator's vector store over `VectorShardActor`s: a list of commands goes to every
    shard as one call (with "set" vectors cut into slices), only scalars come back. A lost shard
    is one line (its slices are gone: the run cannot go on)."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def run(self, commands: list) -> list[float]:
        out = []
        for s, (lo, hi) in zip(self.shards, self.bounds):
            mine = [(c[0], c[1], c[2][lo:hi].numpy()) if c[0] == "set" else c
                    for c in commands]
            out.append(s.execute.remote(mine))
        return combine(commands, get(out, SHARD_LOST))

    def read(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(self.call("pull", name)))

    def call(self, method: str, *args) -> list:
        """`method(*args)` on every shard, in flight together; their results."""
        return self.each(method, [args] * len(self.shards))

    def each(self, method: str, args: list[tuple]) -> list:
        """`method(*args[k])` on shard k, in flight together; their results."""
        return get([getattr(s, method).remote(*a) for s, a in zip(self.shards, args)],
                   SHARD_LOST)


class SandblasterClient:
    """A Sandblaster replica's client: pull a named vector, push a gradient sum (one call per
    shard, in flight together)."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def pull(self, name: str = "x") -> torch.Tensor:
        """A copy of the whole vector (concatenated out of the object store)."""
        return torch.from_numpy(np.concatenate(ray.get([s.pull.remote(name)
                                                        for s in self.shards])))

    def push(self, round_: int, portions: list[int], vector: torch.Tensor,
             solo: bool) -> RayPending:
        array = vector.numpy()
        return RayPending([s.push.remote(round_, portions, array[lo:hi], solo)
                           for s, (lo, hi) in zip(self.shards, self.bounds)], list)


@ray.remote(concurrency_groups={"control": 1})
class SandblasterReplicaActor:
    """A `SandblasterReplica` in its own process. `compute` runs on the actor's main thread,
    `flush` and `info` on a second one ("control"), so the coordinator can collect a replica's
    gradients while it is busy with a (slow or backup) portion."""

    def __init__(self, index: int, config, shard_names: list[str], bounds: list, stats: dict,
                 threads: int, device: str, straggler_delay: float):
        torch.set_num_threads(threads)
        shards = [ray.get_actor(name) for name in shard_names]
        self.replica = SandblasterReplica(index, config, SandblasterClient(shards, bounds),
                                          stats=stats, device=device,
                                          straggler_delay=straggler_delay)

    def compute(self, round_: int, batch: int, portion: int, solo: bool, resolve) -> dict:
        return self.replica.compute(round_, batch, portion, solo, resolve)

    @ray.method(concurrency_group="control")
    def flush(self, round_: int, resolve) -> dict:
        return self.replica.flush(round_, resolve)

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        return {"replica": self.replica.index, "node": node_id(), "pid": os.getpid(),
                "device": str(self.replica.device), "threads": torch.get_num_threads(),
                "straggler_delay": self.replica.straggler_delay}
