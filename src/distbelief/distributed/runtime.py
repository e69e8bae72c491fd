"""Ray for the distributed schemes: starting or joining it, placing actors, waiting for calls,
and turning Ray's errors into ours. Besides the actor modules, the only module that imports Ray.

Vectors cross process boundaries as numpy arrays, which Ray moves through its shared-memory
object store without pickling their bytes (a torch tensor would be pickled); what arrives is a
read-only view of shared memory, which `wire.tensor_view` wraps without copying.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time

import ray
import ray._private.services  # noqa: F401 - for _own_process_groups
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from distbelief.distributed.keeper import SnapshotKeeper
from distbelief.distributed.placement import SHARD_BUNDLE, Node, ReplicaShape, replica_shape
from distbelief.engine.lifecycle import describe
from distbelief.errors import DistbeliefError

START_TIMEOUT_S = 300  # replicas that cannot be placed (resources) fail the run after this


# --- Ray's lifetime -------------------------------------------------------------------------

def start_ray(address: str | None = None, dashboard: bool = False) -> bool:
    """Make sure this process is connected to Ray; returns True when it connected here (the
    caller then calls `ray.shutdown()`), False when Ray was already initialized (tests share
    one local cluster per module).

    Without `address` a local Ray starts on the loopback address (its processes reach each
    other at 127.0.0.1; Ray 2.60 offers no way to stop its gRPC servers also listening on other
    interfaces, which its token authentication guards), sized to this machine, without the
    dashboard unless `dashboard`. With `address` ("host:port" or "auto") it joins that
    cluster. Token authentication stays as Ray configures it.
    """
    if ray.is_initialized():
        return False
    # Ray announces at every start that token authentication is on; it stays on, quietly.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    options = {"logging_level": logging.WARNING, "log_to_driver": True,
               "runtime_env": {"worker_process_setup_hook":
                               "distbelief.distributed.quiet.quiet_worker"}}
    if address:
        check_reachable(address)
        options["address"] = address
    else:
        # "local": always a new local Ray, never one found through RAY_ADDRESS or the
        # current-cluster file a `ray start` left behind.
        options.update(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard,
                       _node_ip_address="127.0.0.1")
    with _keep_sigterm_handler(), _own_process_groups(local=not address):
        try:
            ray.init(**options)
        except Exception as e:  # noqa: BLE001 - whatever Ray's start raises is one line
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise DistbeliefError(f"cannot {where} ({describe(e)[:160]})") from None
    return True


@contextlib.contextmanager
def _own_process_groups(local: bool):
    """Within: the processes a local Ray starts (GCS, raylet, their agents) go in process groups
    of their own. In the driver's group, a SIGTERM sent to the group (SLURM's scancel, a
    supervisor stopping a job) would stop them while the driver still needs them to
    checkpoint; so only the driver hears it, checkpoints, and stops them itself. They still die
    with the driver if it is killed (Ray's fate-sharing). Ray has no option for this, so its
    Popen subclass is wrapped while ray.init runs; on other systems, or if that class moves,
    nothing changes."""
    popen = getattr(ray._private.services, "ConsolePopen", None)
    if not (local and popen is not None and sys.platform.startswith("linux")):
        yield
        return
    original = popen.__init__

    def init(self, *args, **kwargs):
        ray_preexec = kwargs.get("preexec_fn")

        def preexec():
            os.setpgid(0, 0)
            if ray_preexec is not None:
                ray_preexec()

        kwargs["preexec_fn"] = preexec
        original(self, *args, **kwargs)

    popen.__init__ = init
    try:
        yield
    finally:
        popen.__init__ = original


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the SIGTERM handler of the main thread with one that exits; the run
    lifecycle's handler (stop after this step, checkpoint) must stay."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool):
    """Within: connected to Ray (`start_ray`); on exit Ray is shut down if it started here."""
    started = start_ray(address, dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def pickle_by_value(module) -> None:
    """Ship `module`'s functions and classes to the workers by value rather than by name
    (for a user's module that the workers cannot import)."""
    ray.cloudpickle.register_pickle_by_value(module)


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


# --- placement ------------------------------------------------------------------------------

def node_id() -> str:
    """The node this process runs on."""
    return ray.get_runtime_context().get_node_id()


def memory() -> dict:
    """This process's memory in bytes: "peak" resident (VmHWM; it counts the pages of Ray's
    shared object store the process touched, so it overstates what the process owns) and
    "private" resident now (RssAnon: its own tensors and arrays). Linux; elsewhere the peak
    only."""
    import resource

    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss *
           (1 if sys.platform == "darwin" else 1024)}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["peak"] = int(fields["VmHWM"].split()[0]) * 1024
        out["private"] = int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return out


def nodes() -> list[Node]:
    """The cluster's live nodes and their CPUs and GPUs."""
    return [Node(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n["Alive"]]


def replica_options(config, count: int | None = None) -> tuple[dict, ReplicaShape]:
    """Ray options for the replicas of `config`, or `count` actors of that kind
    (`placement.replica_shape` on this cluster's nodes, spread over them, restarted up to
    --max-restarts, no task retries), and the shape."""
    shape = replica_shape(config, nodes(), count)
    return {"num_cpus": shape.num_cpus, "num_gpus": shape.num_gpus,
            "max_restarts": config.cluster.max_restarts, "max_task_retries": 0,
            "scheduling_strategy": "SPREAD"}, shape


def shard_placement(count: int, timeout_s: float = START_TIMEOUT_S) -> tuple[object, list]:
    """A placement group spreading `count` shards over the live nodes, and each shard's
    scheduling strategy. A bundle reserves no CPU (`placement.SHARD_BUNDLE`); when its node is
    lost Ray places the bundle on another node and restarts the shard there, which affinity to
    a node cannot do (hard affinity never leaves the node, and soft affinity spills even while
    the node is there: measured with Ray 2.60).

    Raises:
        DistbeliefError: the bundles could not be placed within `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([dict(SHARD_BUNDLE)] * count, strategy="SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise DistbeliefError(f"the {count} parameter-server shards could not be placed within "
                              f"{timeout_s} s (each reserves {SHARD_BUNDLE})")
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k)
                   for k in range(count)]


def remove_placement(group) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


def wait_started(replicas: list, shape: ReplicaShape,
                 timeout_s: float = START_TIMEOUT_S) -> list[dict]:
    """Every replica's `info()`, once all answer.

    Raises:
        DistbeliefError: naming the replicas that were not placed within `timeout_s`."""
    refs = [r.info.remote() for r in replicas]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        missing = [str(i) for i, ref in enumerate(refs) if ref not in ready]
        capacity = ", ".join(f"{n.cpus:g} CPUs" + (f" + {n.gpus:g} GPUs" if n.gpus else "")
                             for n in nodes())
        raise DistbeliefError(
            f"replica(s) {', '.join(missing)} of {len(refs)} not placed within {timeout_s} s: "
            f"each needs {shape.describe()}, the nodes have {capacity} and other work may "
            f"hold them (see --replica-cpus)")
    return ray.get(refs)


def granted_device() -> torch.device:
    """CUDA when Ray gave this process a GPU (a driver started as a Ray task or job with GPUs),
    else the CPU: a GPU taken outside Ray's accounting could be one a replica needs."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def kill(actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


# --- results --------------------------------------------------------------------------------

class ShardLost(DistbeliefError):
    """A parameter-server shard did not answer: it died, and Ray is restarting it
    (`restarting`) or it is gone for good. Its message is one line for the user."""

    def __init__(self, message: str, restarting: bool = False):
        super().__init__(message)
        self.restarting = restarting


def get(refs, lost: str | None = None):
    """ray.get; with `lost`, an actor that is gone becomes `ShardLost(lost)` (one line), and so
    does a call that failed because an actor it called is gone."""
    try:
        return ray.get(refs)
    except RayTaskError as e:
        raise remote_error(e, lost) from None
    except RayActorError as e:
        if lost is None:
            raise
        raise ShardLost(lost, restarting=isinstance(e, ActorUnavailableError)) from None


def get_unless_dead(refs, actors: list, message):
    """ray.get(refs); when a call failed because an actor died (its own, or the one whose
    result it took as argument), `DistbeliefError(message(dead))`, `dead` being the indices of
    the `actors` that no longer answer."""
    try:
        return ray.get(refs)
    except RayTaskError as e:
        if not isinstance(e.cause, RayActorError):
            raise remote_error(e, None) from None
    except RayActorError:
        pass
    raise DistbeliefError(message(dead_actors(actors)))


def dead_actors(actors: list, timeout_s: float = 60.0) -> list[int]:
    """Indices of the actors that are dead or restarting (a ping fails); one still busy after
    `timeout_s` counts as alive."""
    dead = []
    for i, actor in enumerate(actors):
        try:
            ray.get(actor.info.remote(), timeout=timeout_s)
        except RayActorError:
            dead.append(i)
        except ray.exceptions.GetTimeoutError:
            pass
    return dead


def remote_error(error: RayTaskError, lost: str | None) -> BaseException:
    """The error to raise for a call that raised inside an actor: our own errors as they are
    (one line for the user), an actor it called being gone as `ShardLost(lost)`, anything else
    (a bug) as Ray reports it."""
    if isinstance(error.cause, DistbeliefError):
        return error.cause
    if lost is not None and isinstance(error.cause, RayActorError):
        return ShardLost(lost)
    return error


class RayPending:
    """Ray calls in flight whose results are combined by `combine` once all have arrived (the
    pending-call protocol of `distributed.pending`)."""

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


def _raise(r: int, tag, error: BaseException) -> None:
    raise error


class ReplicaCalls:
    """Calls to replica actors in flight, each death of a replica turned into one failure.

    `submit(r, method, *args, tag=...)` calls replica r; `wait(timeout)` returns
    [(r, tag, result)] for calls completed by then (at most one per wait). When a call fails
    because its replica died, `book` (an `engine.lifecycle.FailureBook`) counts one failure and
    decides whether Ray restarts it; the replica's other calls in flight fail with it and are
    dropped; `on_failure(r, tags, restarted)` tells the scheme which work was lost (the failed
    call's tag first). A restarting replica gets no calls (`ready(r)` is False) until it answers
    a ping, then `on_recovered(r)`: calls handed to an actor Ray is restarting fail at once,
    and would otherwise count one death many times.

    A call that raised inside its replica goes to `on_error(r, tag, error)` (`remote_error`;
    `lost` is the message for a shard that is gone), which raises it unless told otherwise;
    an error with a true `replica_failure` attribute (a partition of the replica died) counts
    as the replica's death.
    """

    def __init__(self, actors: list, book, *, lost: str, position, on_failure,
                 on_recovered=lambda r: None, on_error=None):
        self.actors, self.book, self.lost, self.position = actors, book, lost, position
        self.on_failure, self.on_recovered = on_failure, on_recovered
        self.on_error = on_error or _raise
        self.inflight: dict = {}  # ObjectRef -> (replica, tag)
        self.recovering: dict = {}  # ObjectRef of a ping -> replica Ray is restarting

    def submit(self, r: int, method: str, *args, tag=None) -> None:
        self.inflight[getattr(self.actors[r], method).remote(*args)] = (r, tag)

    def ready(self, r: int) -> bool:
        """Whether replica r may get calls: not given up, not restarting."""
        return r in self.book.alive and r not in self.recovering.values()

    def busy(self) -> set[int]:
        return {r for r, _ in self.inflight.values()}

    @property
    def empty(self) -> bool:
        return not self.inflight and not self.recovering

    def wait(self, timeout: float) -> list[tuple]:
        waiting = list(self.inflight) + list(self.recovering)
        if not waiting:
            return []
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            if ref in self.recovering:
                self._pinged(ref)
            elif ref in self.inflight:
                r, tag = self.inflight.pop(ref)
                try:
                    done.append((r, tag, ray.get(ref)))
                except RayTaskError as e:
                    error = remote_error(e, self.lost)
                    if getattr(error, "replica_failure", False):
                        self._died(r, tag, error)  # a part of the replica died: the same
                    else:
                        self.on_error(r, tag, error)
                except RayActorError as e:
                    self._died(r, tag, e)
        return done

    def _died(self, r: int, tag, error: BaseException) -> None:
        dropped = [ref for ref, (who, _) in self.inflight.items() if who == r]
        tags = [tag] + [self.inflight.pop(ref)[1] for ref in dropped]
        restarted = self.book.replica_failed(r, error, self.position())
        self.on_failure(r, tags, restarted)
        if restarted:
            self.recovering[self.actors[r].info.remote()] = r

    def _pinged(self, ref) -> None:
        r = self.recovering.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again shortly
            time.sleep(0.05)
            self.recovering[self.actors[r].info.remote()] = r
        except RayActorError as e:  # it died again while restarting: a new failure
            self._died(r, None, e)
        except RayTaskError as e:  # a part of it is gone for good (partitioned replicas)
            self._died(r, None, e)
        else:
            self.on_recovered(r)


# --- the snapshot keeper --------------------------------------------------------------------

KeeperActor = ray.remote(num_cpus=0)(SnapshotKeeper)


def start_keeper(name: str):
    """A `SnapshotKeeper` actor named `name` on this (the driver's) node: if that node is lost,
    the run is lost anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return KeeperActor.options(
        name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id(), soft=False),
    ).remote()


class SnapshotSender:
    """Sends a shard's snapshots to the keeper from a background thread, so that the shard's
    own thread (its pushes) never waits for the transfer. `busy()` is True from `send` until
    Ray holds its own copy of the snapshot's arrays: until then the caller must not reuse them
    (and skips a snapshot rather than queueing one)."""

    def __init__(self, keeper_name: str, key: str):
        self.keeper, self.key = ray.get_actor(keeper_name), key
        self.slot, self.sending, self.sent = None, False, 0
        self.ready = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name=f"snapshots-{key}").start()

    def busy(self) -> bool:
        return self.slot is not None or self.sending

    def send(self, snapshot: dict) -> None:
        with self.ready:
            self.slot, self.sending = snapshot, True
            self.ready.notify()

    def send_now(self, snapshot: dict) -> None:
        """Send and wait until the keeper has it."""
        ray.get(self.keeper.put.remote(self.key, snapshot))
        self.sent += 1

    def _run(self) -> None:
        while True:
            with self.ready:
                while self.slot is None:
                    self.ready.wait()
                snapshot, self.slot = self.slot, None
            ref = self.keeper.put.remote(self.key, snapshot)  # the arrays are in Ray's store now
            self.sending = False
            ray.get(ref)
            self.sent += 1

    def restore(self) -> dict | None:
        """The newest snapshot the keeper holds for this key."""
        return ray.get(self.keeper.get.remote(self.key))
