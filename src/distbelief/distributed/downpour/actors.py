"""Downpour's Ray actors: thin wrappers around `ParameterShard`, `DownpourReplica` and, for
partitioned replicas, `ServerStage` and `PartitionedReplica`, where the logic lives and is
tested without Ray; and the replicas' client over the shard actors.

Failures are Ray's business: shards are created with --max-restarts and unlimited task retries,
so a killed shard is restarted by Ray (on another node if its node is lost), restores the
keeper's latest snapshot in its constructor, and the replicas' pending pulls and pushes are
retried against it. Replicas are created with
--max-restarts and no task retries: the driver sees the failed chunk, counts it and hands the
restarted replica its next chunk.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from distbelief.distributed.downpour.bound import ReplicaClocks, StalenessBound
from distbelief.distributed.downpour.generation import sees, write_piece
from distbelief.distributed.downpour.layout import PartSlice, start_values
from distbelief.distributed.downpour.partitioned import PartitionedReplica, ServerStage
from distbelief.distributed.downpour.replica import DownpourReplica
from distbelief.distributed.downpour.shard import ParameterShard, shard_lost
from distbelief.distributed.keeper import SnapshotFile
from distbelief.distributed.pipeline.actors import (RELAY, StageHost, caller, handed_on,
                                                   received, watcher)
from distbelief.distributed.runtime.calls import (RayPending, dead_actors, remote_error,
                                                  when_answering)
from distbelief.distributed.runtime.cluster import START_TIMEOUT_S, memory, node_id, nodes
from distbelief.distributed.runtime.snapshots import SnapshotSender
from distbelief.distributed.wire import decode, encode, join_slices, tensor_view, wire_dtype
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.engine.losses import get_loss
from distbelief.errors import DistbeliefError


def _join_pulls(pulled: list, dtype: torch.dtype = torch.float32,
                out: np.ndarray | None = None) -> tuple[torch.Tensor, list[int]]:
    """(the full vector, the shards' versions) from the shards' (slice, version) pairs."""
    return join_slices([w for w, _ in pulled], dtype, out), [v for _, v in pulled]


class RayClient:
    """The replicas' server client over shard actors: one call per shard, all in flight at once.
    Calls from one replica to one shard run in the order they were sent (Ray's per-caller actor
    ordering), so a replica's fetch never overtakes its own earlier push.

    Vectors travel in `dtype` (--ps-transfer-dtype). A push is put into the object store once,
    and every shard reads its slice of that one object (on one node, a view of shared memory;
    `one_put` False sends each shard only its slice, for shards on several nodes, each of which
    would otherwise fetch the whole vector). Fetched slices are joined into one reused array:
    a fetched vector is valid until the next fetch's result is read."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]],
                 dtype: torch.dtype = torch.float32, one_put: bool = True):
        self.shards, self.bounds, self.dtype, self.one_put = shards, bounds, dtype, one_put
        self.joined: np.ndarray | None = None

    def _join(self, pulled: list) -> tuple[torch.Tensor, list[int]]:
        vector, versions = _join_pulls(pulled, self.dtype, self.joined)
        if len(pulled) > 1:
            self.joined = encode(vector)  # the array it was joined into, for the next join
        return vector, versions

    def fetch(self, source: int | None = None) -> RayPending:
        return RayPending([s.pull.remote(source) for s in self.shards], self._join)

    def push(self, vector: torch.Tensor, base_versions: list[int], steps: int,
             errors: tuple[float, ...], pull: bool = False,
             source: tuple | None = None) -> RayPending:
        array = encode(vector.to(self.dtype))
        method = "push_pull" if pull else "push"
        if self.one_put:
            whole = ray.put(array)  # one copy into shared memory; each shard reads a view
            refs = [getattr(s, method).remote(whole, v, steps, errors, source, span)
                    for s, span, v in zip(self.shards, self.bounds, base_versions)]
        else:
            refs = [getattr(s, method).remote(array[lo:hi], v, steps, errors, source)
                    for s, (lo, hi), v in zip(self.shards, self.bounds, base_versions)]
        if not pull:
            return RayPending(refs, list)
        return RayPending(refs, lambda out: ([reply for reply, _ in out],
                                             self._join([pulled for _, pulled in out])))


def server_vector(shards: list) -> torch.Tensor:
    """The server's current [parameters; buffers], gathered from all shards at once (read-only
    when there is one shard), in float32 whatever the transfer dtype."""
    return _join_pulls(ray.get([s.pull.remote(None, True) for s in shards]))[0]


@ray.remote(num_cpus=0)
class ShardActor:
    """A `ParameterShard` in its own process. The driver calls `start(values)` (a new run) or
    `start(state=snapshot)` (resume: the shard's snapshot of the checkpoint). Every
    --snapshot-every-s the shard copies its state between two pushes and a background thread
    sends it to the keeper on the driver's node: a push never waits for the transfer, nor for a
    disk (the driver writes checkpoints). After a failure Ray re-runs the constructor, on any
    node (the placement group moves the shard when its node is lost), which restores the
    keeper's snapshot, so a restarted shard never needs the driver; pushes that were in flight
    are retried by Ray and applied once (`ParameterShard`'s push sources).

    --snapshot-every-s 0 keeps no snapshots (a model so large that a second copy of the server
    does not fit): a shard that dies then cannot restart, and the run stops with one line;
    --resume continues from the last checkpoint."""

    def __init__(self, index: int, lo: int, hi: int, n_params: int, config, keeper_name: str,
                 retention: np.ndarray | None = None):
        self.args, self.config, self.retention = (index, lo, hi, n_params), config, retention
        self.dtype = wire_dtype(config)
        # Its update runs on --ps-threads Python threads (`optim.Ranges`), never on torch's
        # OpenMP workers, which spin on cores the replicas compute on.
        torch.set_num_threads(1)
        # Snapshots go to the keeper (copies) or, --snapshot-store disk, to a file on this
        # node, written from the shard's live state.
        self.live = config.downpour.snapshot_store == "disk"
        self.sender = SnapshotFile(keeper_name, f"shard-{index}") if self.live else \
            SnapshotSender(keeper_name, f"shard-{index}")
        self.incarnation = uuid.uuid4().hex  # new on every (re)start: the driver counts restarts
        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
            warnings.simplefilter("ignore")
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.shard, self.restored_version, self.buffers = None, None, {}
        self.snapshots = config.downpour.snapshot_every_s > 0
        if self.reconstructed:
            snapshot = self.sender.restore()
            if snapshot is None:  # snapshots off: no restart (Ray reports the shard dead)
                raise DistbeliefError(f"shard {index} has no snapshot to restart from "
                                      f"(--snapshot-every-s 0, or --snapshot-store disk on "
                                      f"another node)")
            self._build(None)
            self.restored_version = self.shard.restore(snapshot)

    def _build(self, values) -> None:
        index, lo, hi, n_params = self.args
        initial = torch.zeros(hi - lo) if values is None else tensor_view(values)
        # Values of this process's own (zeros, computed here) become the shard's: no copy.
        self.shard = ParameterShard(index, lo, hi, n_params, initial, self.config,
                                    retention=self.retention,
                                    take=values is None or values.flags.writeable)

    def start(self, values: np.ndarray | PartSlice | None = None,
              state: dict | None = None, state_file: str | None = None) -> int:
        """Begin at `values` (or those a `layout.PartSlice` computes here), or at a
        checkpointed snapshot `state` (or the one this process reads from `state_file`);
        returns the version. The keeper has a snapshot before this returns, so a restart
        always finds one."""
        self._build(None if values is None else start_values(values))
        if state_file is not None:  # read as restored, into the shard's own vector
            state = load_checkpoint(state_file, mmap=True)["shard"]
        if state is not None:
            self.shard.restore(state)
        if self.snapshots:
            self.sender.send_now(self.shard.snapshot(live=self.live))
        return self.shard.version

    def pull(self, source: int | None = None, exact: bool = False) -> tuple[np.ndarray, int]:
        """(values, version), in the transfer dtype unless `exact` (float32: the driver's
        checkpoints and evaluations)."""
        dtype = torch.float32 if exact else self.dtype
        w, version = self.shard.pull(copy=False, source=source, dtype=dtype)
        return encode(w), version

    def push(self, update: np.ndarray, base_version: int, steps: int, errors,
             source=None, span: tuple[int, int] | None = None) -> dict:
        """Apply a push: `update` is this shard's slice, or with `span` = (lo, hi) the whole
        pushed vector, of which this shard reads [lo, hi) (`RayClient`'s one put)."""
        values = decode(update, self.dtype)
        if span is not None:
            values = values[span[0]:span[1]]
        reply = self.shard.push(values, base_version, steps, tuple(errors),
                                None if source is None else tuple(source))
        if self.snapshots and self.shard.snapshot_due() and not self.sender.busy():
            # Into the same arrays every time: the sender has handed the last ones to Ray.
            self.sender.send(self.shard.snapshot(self.buffers, live=self.live))
        return reply

    def push_pull(self, update: np.ndarray, base_version: int, steps: int, errors,
                  source=None, span: tuple[int, int] | None = None):
        """`push`, then `pull`: (reply, (values, version))."""
        reply = self.push(update, base_version, steps, errors, source, span)
        return reply, self.pull(source)

    def snapshot(self) -> dict:
        """The shard's state now (for the driver's checkpoint); the keeper gets it too."""
        snapshot = self.shard.snapshot()
        if self.snapshots:
            self.sender.send(snapshot)
        return snapshot

    def sees(self, path: str, seen: tuple[int, int]) -> bool:
        """Whether this process sees the driver's file `path` (`generation.sees`)."""
        return sees(path, seen)

    def write_piece(self, path: str, marker: str, seen: tuple[int, int]) -> dict | None:
        """The snapshot written by this process as its file of a generation
        (`generation.write_piece`; the keeper gets it too); None when it does not see the
        generation's folder (its `marker`)."""
        if not sees(marker, seen):
            return None
        snapshot = self.shard.snapshot(live=True)  # written before anything changes
        if self.snapshots:
            self.sender.send(snapshot if self.live else self.shard.snapshot())
        return write_piece(snapshot, path)

    def forget(self) -> None:
        """The run is over: a snapshot file goes (--snapshot-store disk)."""
        if self.live:
            self.sender.forget()

    def retire(self, replica: int) -> bool:
        """Replica `replica` is gone for good (`ParameterShard.retire`)."""
        return self.shard.retire(replica)

    def status(self) -> dict:
        return {**self.shard.stats(), "incarnation": self.incarnation,
                "reconstructed": self.reconstructed, "restored_version": self.restored_version,
                "snapshots_sent": self.sender.sent, "node": node_id(), "pid": os.getpid(),
                "memory": memory()}


@ray.remote(num_cpus=0)
class ClockActor:
    """The replicas' clocks under --ssp-bound (`bound.ReplicaClocks`): an async actor, so that
    a replica's `wait` parks here while the others' reports go on. Restarted by Ray with an
    empty table (every replica then joins again, level with the slowest)."""

    def __init__(self, bound: int):
        self.clocks = ReplicaClocks(bound)
        self.changed = asyncio.Condition()

    async def _changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def report(self, replica: int, position: int) -> float | None:
        level = self.clocks.report(replica, position)
        await self._changed()
        return level

    async def wait(self, replica: int, position: int) -> float | None:
        """`report`, then the replica's level once it may train the step at `position`.
        (Reporting here too: an async actor may run a replica's calls out of order.)"""
        await self.report(replica, position)
        async with self.changed:
            await self.changed.wait_for(lambda: self.clocks.allowed(replica, position))
        return self.clocks.level(replica)

    async def leave(self, replica: int) -> None:
        self.clocks.leave(replica)
        await self._changed()

    async def release(self) -> None:
        self.clocks.release()
        await self._changed()


class RayClocks:
    """`StalenessBound`'s client over a `ClockActor`."""

    def __init__(self, actor):
        self.actor = actor

    def report(self, replica: int, position: int) -> RayPending:
        return RayPending([self.actor.report.remote(replica, position)], lambda out: out[0])

    def wait(self, replica: int, position: int) -> RayPending:
        return RayPending([self.actor.wait.remote(replica, position)], lambda out: out[0])


def staleness_bound(replica: int, config, clock_name: str | None) -> StalenessBound | None:
    """Replica `replica`'s side of --ssp-bound (None without it), over the clock actor found
    by name."""
    if clock_name is None:
        return None
    return StalenessBound(replica, config.downpour.ssp_bound,
                          RayClocks(ray.get_actor(clock_name)))


@ray.remote
class ReplicaActor:
    """A `DownpourReplica` in its own process, using `threads` CPU threads. It finds the shards
    by name: actor handles among constructor arguments would pin them in the object store,
    which Ray warns makes restarts fragile."""

    def __init__(self, index: int, config, shard_names: list[str], bounds: list, stats: dict,
                 threads: int, device: str, clock_name: str | None = None):
        torch.set_num_threads(threads)
        shards = [ray.get_actor(name) for name in shard_names]
        client = RayClient(shards, bounds, wire_dtype(config), one_put=len(nodes()) == 1)
        self.replica = DownpourReplica(index, config, client, stats=stats,
                                       device=torch.device(device),
                                       bound=staleness_bound(index, config, clock_name))

    def run(self, start: int, steps: int) -> dict:
        return self.replica.run(start, steps)

    def drain(self) -> dict:
        return self.replica.drain()

    def info(self) -> dict:
        return {"replica": self.replica.index, "node": node_id(),
                "device": str(self.replica.device), "threads": torch.get_num_threads()}


class ServerStageHost(StageHost):
    """Partition `index` of `count` of Downpour replica `replica` (`ServerStage`): its part's
    values come from, and its gradients go to, the shards named `shard_names` (their slices
    `bounds` in its block) and no others."""

    def __init__(self, index: int, count: int, module, config, threads: int, device: str,
                 shard_names: list[str], bounds: list, replica: int):
        self.incarnation = os.urandom(8).hex()
        device = self.settle(config, threads, device)
        client = RayClient([ray.get_actor(n) for n in shard_names], bounds, wire_dtype(config),
                           one_put=len(nodes()) == 1)
        self.stage = ServerStage(index, count, module, get_loss(config.loss), config, client,
                                 replica, device)
        self.open_mailbox()

    def begin(self, step: int) -> None:
        self.stage.begin(step)

    def finish(self, step: int, error: float) -> None:
        self.stage.finish(step, error)

    def take_metrics(self) -> dict:
        return self.stage.take_metrics()

    def drain(self) -> dict:
        return self.stage.drain()

    def reset(self) -> None:
        self.stage.reset()


    def begin_eval(self) -> None:
        self.stage.begin_eval()

    def evaluate(self, micro: int, x):
        return handed_on(self.stage.evaluate(micro, received(x)))

    def end_eval(self) -> None:
        self.stage.end_eval()


ServerStageActor = ray.remote(concurrency_groups=RELAY)(ServerStageHost)


EVAL_ATTEMPTS = 3  # tries of an evaluation batch whose partition died (`ServerEval`)


class ServerEval(torch.nn.Module):
    """The server's model as an evaluation sees it, computed by one replica's partition
    actors `stages`: `model(x)` is their eval-mode output, each partition running all of x's
    `micro` micro-batches on a copy of its part at the server's values then
    (`ServerStage.begin_eval`), dropped before the next partition makes its own: one part's
    copy at a time on the whole cluster, for one more fetch of each part per batch. This
    process holds no parameters."""

    def __init__(self, stages: list, micro: int, lost: str):
        super().__init__()
        self.stages, self.micro, self.lost = stages, micro, lost
        self.call = caller(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A partition that dies meanwhile (the replica's training goes on after Ray restarts
        it) is waited for, and the batch computed again: up to EVAL_ATTEMPTS times."""
        for _ in range(EVAL_ATTEMPTS - 1):
            try:
                return self._forward(x)
            except RayActorError:
                when_answering(self.stages, START_TIMEOUT_S)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = list(torch.tensor_split(x, max(1, min(self.micro, len(x)))))
        for p, stage in enumerate(self.stages):
            self._get(stage.begin_eval.remote())
            outputs = [self.call(p, "evaluate", m, a) for m, a in enumerate(outputs)]
            # Submitted after its evaluations, so they are done when it is.
            self._get(stage.end_eval.remote())
        return torch.cat([received(o).float() for o in self._get(outputs)])

    def _get(self, refs):
        """ray.get: a shard gone for good inside a partition's call is `ShardLost`; a
        RayActorError of its own (a partition died) is raised as it is, for `forward`."""
        try:
            return ray.get(refs)
        except RayTaskError as e:
            raise remote_error(e, self.lost) from None


class PartitionLost(DistbeliefError):
    """A partition actor of a replica died during a call; Ray restarts it (its values come
    back from the server), and the replica's step is retried."""

    replica_failure = True  # runtime.calls.ReplicaCalls counts it as the replica's death


@ray.remote(num_cpus=0)
class PartitionedReplicaActor:
    """A Downpour replica's head (`PartitionedReplica`): its data slice and the schedule; its
    partitions are `ServerStageActor`s found by name (handles among constructor arguments
    would pin them, which Ray warns makes restarts fragile)."""

    def __init__(self, index: int, config, stage_names: list[str], stats: dict,
                 clock_name: str | None = None):
        self.config = config
        self.stages = [ray.get_actor(name) for name in stage_names]
        self.replica = PartitionedReplica(index, config, caller(self.stages), self._get,
                                          len(self.stages), stats=stats,
                                          bound=staleness_bound(index, config, clock_name),
                                          handoff=config.cluster.pipeline_handoff,
                                          watch=watcher(self.stages))

    def _get(self, refs):
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            error = e
        # A call fails with a RayActorError of its own only when the partition it went to
        # died (this process calls nothing else; a shard's death reaches it inside a
        # RayTaskError of the partition that called the shard), though Ray may have restarted
        # that partition by now, so that the ping finds every partition alive.
        if not isinstance(error, RayTaskError) or dead_actors(self.stages):
            raise PartitionLost(f"a partition of replica {self.replica.index} died; Ray "
                                f"restarts it and its steps are handed out again")
        cause = error.cause
        if isinstance(cause, DistbeliefError):
            raise cause
        if isinstance(cause, RayActorError):  # the partitions live: a shard is gone for good
            raise DistbeliefError(shard_lost(self.config))
        raise error

    def run(self, start: int, steps: int) -> dict:
        return self.replica.run(start, steps)

    def drain(self) -> dict:
        return self.replica.drain()

    def info(self) -> dict:
        """Once every partition answers (waiting while Ray restarts one), and what a failed
        chunk left on them is dropped: the driver's ping before it hands out work again."""
        parts = when_answering(self.stages, START_TIMEOUT_S)
        self.replica.recover()  # what a failed chunk left on the partitions goes
        return {"replica": self.replica.index, "node": node_id(), "pid": os.getpid(),
                "partitions": parts}
