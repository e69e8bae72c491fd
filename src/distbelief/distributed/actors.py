"""The Ray layer: parameter shards and replicas as actors, the replicas' client, starting Ray.

Actors are thin: each method forwards to the plain class (`ParameterShard`, `DownpourReplica`,
and for Sandblaster `VectorShard`, `SandblasterReplica`),
which is where the logic lives and is tested without Ray. Vectors cross process boundaries as
numpy arrays, which Ray moves through its shared-memory object store without pickling their
bytes (a torch tensor would be pickled).

Failures are Ray's business, not ours: shards are created with `max_restarts` and unlimited
task retries, so a killed shard is restarted by Ray, reloads its latest snapshot in its
constructor, and the replicas' pending pulls and pushes are retried against it. Replicas are
created with `max_restarts` and no task retries: the driver sees the failed chunk, counts it and
hands the restarted replica its next chunk.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
import warnings

import numpy as np
import ray
import torch

from distbelief.distributed.downpour import DownpourReplica
from distbelief.distributed.sandblaster import SandblasterReplica, VectorShard, combine
from distbelief.distributed.shard import ParameterShard
from distbelief.errors import DistbeliefError

# Arrays that arrive through the object store are read-only views of shared memory; shards and
# replicas only read them, so torch's warning about non-writable arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def start_ray(address: str | None = None, dashboard: bool = False) -> bool:
    """Make sure this process is connected to Ray; returns True when it connected here (the
    caller then calls `ray.shutdown()`), False when Ray was already initialized (tests share
    one local cluster per module).

    Without `address` a local Ray starts on the loopback address (its processes reach each
    other at 127.0.0.1; Ray 2.60 offers no way to stop its gRPC servers also listening on other
    interfaces, which its token authentication guards), sized to this machine, without the
    dashboard unless `dashboard`. With `address` ("host:port" or "auto")
    it joins that cluster. Token authentication stays as Ray configures it.
    """
    if ray.is_initialized():
        return False
    # Ray announces at every start that token authentication is on; it stays on, quietly.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DistbeliefError(f"cannot join the Ray cluster at {address} "
                                  f"({str(e).strip().splitlines()[0][:160]})") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=dashboard,
                 _node_ip_address="127.0.0.1", **quiet)
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for a minute)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DistbeliefError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); "
                              f"start it with 'ray start --head' or drop --address") from None


class Pending:
    """Ray calls in flight whose results are combined by `combine` once all have arrived."""

    def __init__(self, refs: list, combine):
        self.refs, self.combine, self._done = refs, combine, False
        self._result, self._have_result = None, False

    def done(self) -> bool:
        if not self._done:
            ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
            self._done = len(ready) == len(self.refs)
        return self._done

    def result(self):
        if not self._have_result:  # kept: a push that also pulled is read twice
            self._result, self._have_result = self.combine(ray.get(self.refs)), True
        return self._result


def _join_pulls(pulled: list) -> tuple[torch.Tensor, list[int]]:
    """The full vector from the shards' slices. With one shard it is the (read-only) array in
    the object store itself; callers copy out of it and never write to it."""
    arrays = [w for w, _ in pulled]
    joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return torch.from_numpy(joined), [v for _, v in pulled]


class RayClient:
    """The replicas' server client over shard actors: one call per shard, all in flight at once.
    Calls from one replica to one shard run in the order they were sent (Ray's per-caller actor
    ordering), so a replica's fetch never overtakes its own earlier push."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def fetch(self) -> Pending:
        return Pending([s.pull.remote() for s in self.shards], _join_pulls)

    def push(self, vector: torch.Tensor, base_versions: list[int], steps: int,
             errors: tuple[float, ...], pull: bool = False) -> Pending:
        array = vector.numpy()
        method = "push_pull" if pull else "push"
        refs = [getattr(s, method).remote(array[lo:hi], v, steps, errors)
                for s, (lo, hi), v in zip(self.shards, self.bounds, base_versions)]
        if not pull:
            return Pending(refs, list)
        return Pending(refs, lambda out: ([reply for reply, _ in out],
                                          _join_pulls([pulled for _, pulled in out])))


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class ShardActor:
    """A `ParameterShard` in its own process. The driver calls `start(values)` (a new run: the
    shard writes its first snapshot at once) or `start(None)` (resume: it loads its snapshot).
    After a failure Ray re-runs the constructor, which reloads the latest snapshot, so a
    restarted shard never needs the driver."""

    def __init__(self, index: int, lo: int, hi: int, n_params: int, config, snapshot_path: str):
        self.args = (index, lo, hi, n_params)
        self.config, self.snapshot_path = config, snapshot_path
        self.incarnation = uuid.uuid4().hex  # new on every (re)start: the driver counts restarts
        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
            warnings.simplefilter("ignore")
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.shard, self.restored_version = None, None
        if self.reconstructed:
            self.start(None)

    def start(self, values: np.ndarray | None) -> int:
        """Begin at `values`, or at the snapshot when None; returns the version."""
        index, lo, hi, n_params = self.args
        initial = torch.zeros(hi - lo) if values is None else torch.from_numpy(values)
        self.shard = ParameterShard(index, lo, hi, n_params, initial, self.config,
                                    self.snapshot_path)
        if values is None:
            self.restored_version = self.shard.restore()
        else:
            self.shard.snapshot()
        return self.shard.version

    def pull(self) -> tuple[np.ndarray, int]:
        w, version = self.shard.pull(copy=False)
        return w.numpy(), version

    def push(self, update: np.ndarray, base_version: int, steps: int, errors) -> dict:
        return self.shard.push(torch.from_numpy(update), base_version, steps, tuple(errors))

    def push_pull(self, update: np.ndarray, base_version: int, steps: int, errors):
        """`push`, then `pull`: (reply, (values, version))."""
        return self.push(update, base_version, steps, errors), self.pull()

    def snapshot(self) -> int:
        return self.shard.snapshot()

    def status(self) -> dict:
        return {**self.shard.stats(), "incarnation": self.incarnation,
                "reconstructed": self.reconstructed, "restored_version": self.restored_version,
                "node": _node_id()}


@ray.remote
class ReplicaActor:
    """A `DownpourReplica` in its own process, using `threads` CPU threads."""

    def __init__(self, index: int, config, shard_names: list[str], bounds: list, stats: dict,
                 threads: int, device: str):
        torch.set_num_threads(threads)
        shards = [ray.get_actor(name) for name in shard_names]
        self.replica = DownpourReplica(index, config, RayClient(shards, bounds), stats=stats,
                                       device=torch.device(device))

    def run(self, start: int, steps: int) -> dict:
        return self.replica.run(start, steps)

    def drain(self) -> dict:
        return self.replica.drain()

    def info(self) -> dict:
        return {"replica": self.replica.index, "node": _node_id(),
                "device": str(self.replica.device), "threads": torch.get_num_threads()}


def pinned_round_robin(count: int) -> list:
    """Hard node-affinity strategies placing `count` zero-CPU actors round-robin over the live
    nodes. Ray's SPREAD packs actors that reserve no CPU onto one node and soft affinity
    spills (measured with Ray 2.60), so the parameter-server shards are pinned."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return [NodeAffinitySchedulingStrategy(nodes[k % len(nodes)], soft=False)
            for k in range(count)]


# --- Sandblaster ------------------------------------------------------------------------

def _gather(refs: list) -> torch.Tensor:
    """A whole vector from the shards' slices, copied out of the object store."""
    return torch.from_numpy(np.concatenate(ray.get(refs)))


def _commands_in(commands: list) -> list:
    return [(c[0], c[1], torch.from_numpy(c[2])) if c[0] == "set" else c for c in commands]


@ray.remote(num_cpus=0)
class VectorShardActor:
    """A `VectorShard` (Sandblaster: its slices of the L-BFGS vectors) in its own process."""

    def __init__(self, index: int, lo: int, hi: int):
        self.shard = VectorShard(index, lo, hi)

    def execute(self, commands: list) -> list:
        return self.shard.execute(_commands_in(commands))

    def push(self, round_: int, portions: list, update: np.ndarray, solo: bool) -> str:
        return self.shard.push(round_, portions, torch.from_numpy(update), solo)

    def pull(self, name: str = "x") -> np.ndarray:
        return self.shard.pull(name).numpy()

    def snapshot(self, path: str, iteration: int) -> None:
        self.shard.snapshot(path, iteration)

    def restore(self, path: str) -> int:
        return self.shard.restore(path)

    def stats(self) -> dict:
        return {**self.shard.stats(), "node": _node_id()}


class RayShards:
    """The coordinator's vector store over `VectorShardActor`s: a list of commands goes to every
    shard as one call (with "set" vectors cut into slices), only scalars come back."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def run(self, commands: list) -> list[float]:
        out = []
        for s, (lo, hi) in zip(self.shards, self.bounds):
            mine = [(c[0], c[1], c[2][lo:hi].numpy()) if c[0] == "set" else c
                    for c in commands]
            out.append(s.execute.remote(mine))
        return combine(commands, get_from_shards(out))

    def read(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(get_from_shards(
            [s.pull.remote(name) for s in self.shards])))


def get_from_shards(refs: list) -> list:
    """ray.get, with a lost shard reported in one line: its slices of the L-BFGS vectors are
    gone, so the run cannot go on (--resume restarts from the last checkpoint)."""
    from ray.exceptions import RayActorError

    try:
        return ray.get(refs)
    except RayActorError:
        raise DistbeliefError("a parameter-server shard is gone; --resume continues from the "
                              "last checkpoint") from None


class SandblasterClient:
    """A Sandblaster replica's client: pull a named vector, push a gradient sum (one call per
    shard, in flight together)."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def pull(self, name: str = "x") -> torch.Tensor:
        return _gather([s.pull.remote(name) for s in self.shards])

    def push(self, round_: int, portions: list[int], vector: torch.Tensor, solo: bool) -> Pending:
        array = vector.numpy()
        return Pending([s.push.remote(round_, portions, array[lo:hi], solo)
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
        return {"replica": self.replica.index, "node": _node_id(), "pid": os.getpid(),
                "device": str(self.replica.device), "threads": torch.get_num_threads(),
                "straggler_delay": self.replica.straggler_delay}
