"""Downpour on a virtual cluster (--virtual): N replicas and K shards in one process, on a
simulated clock. No Ray.

Everything that decides the numbers is real: the replicas (`DownpourReplica`, their
gradients, fetches, pushes, n_fetch / n_push, fetch-wait policy, warmstart), the shards and
update rules (`ParameterShard`), the records, checkpoints and run directory of a Ray run. What
is simulated is only *when* each thing happens (`costs`): a replica's compute time per step,
every message's time on the network, every shard's queue and update time. Each replica is a
process of an `simulation.EventLoop`: its code runs unchanged, but its clock
(`ProcessClock`) is simulated, so 64 replicas cost what their 64 gradients cost, not 64
machines. A push applied at a shard at simulated time t changes the values every later pull
sees, exactly as on a cluster whose timing the cost model describes; the staleness is what
that timing gives, not fixed as in --lockstep. Replicas cut into partitions (--partitions)
run as on Ray, each partition a node of its own (`virtual_partitions`).

`wall_s` in the records is the simulated time (so `distbelief plot --x wall` draws the
DistBelief Fig. 4 view for the virtual cluster); `real_wall_s` is this machine's. A virtual
run is a pure function of its config and its cost model: with --virtual-step-ms and
--virtual-shard-ms given, it repeats bit for bit (CPU, --deterministic).
"""

from __future__ import annotations

import copy
import time
from collections import deque
from functools import partial

import torch

from distbelief.data.build import load_arrays
from distbelief.distributed.downpour.layout import server_layout, start_values
from distbelief.distributed.downpour.costs import (REQUEST_BYTES, Network, StepTimes,
                                                   measure_shard, measure_step)
from distbelief.distributed.downpour.lockstep import LockstepTrainer
from distbelief.distributed.downpour.records import ChunkWindow, ShardMonitor
from distbelief.distributed.downpour.replica import DownpourReplica
from distbelief.distributed.downpour.rules import describe
from distbelief.distributed.downpour.simulation import EventLoop, Signal
from distbelief.distributed.downpour.work import WorkQueue
from distbelief.distributed.pending import ItemOf
from distbelief.distributed.wire import wire_dtype
from distbelief.engine.config import parse_link
from distbelief.engine.setup import build_model
from distbelief.engine.failures import FailureBook


def _join_pulls(parts: list) -> tuple[torch.Tensor, list[int]]:
    return torch.cat([w for w, _ in parts]), [v for _, v in parts]


def _join_push_pull(parts: list) -> tuple[list, tuple]:
    return [reply for reply, _ in parts], _join_pulls([pulled for _, pulled in parts])


class VirtualServer:
    """The shards on their nodes: each serves one request at a time in arrival order, taking
    `push_s[k]` per push and `pull_s[k]` per pull (`costs`), and answers over `network`."""

    def __init__(self, loop: EventLoop, shards: list, network: Network, push_s: list[float],
                 pull_s: list[float], dtype: torch.dtype):
        self.loop, self.shards, self.network, self.dtype = loop, shards, network, dtype
        self.push_s, self.pull_s = push_s, pull_s
        self.free = [0.0] * len(shards)  # when each shard is done with its queue

    def send(self, source, k: int, nbytes: int, seconds: float, action, *args) -> None:
        """A request of `nbytes` from node `source` to shard k, served for `seconds` once it
        arrives and the shard is free; then `action(*args)` runs there."""
        arrival = self.network.send(self.loop.now, source, ("shard", k), nbytes)
        self.loop.at(arrival, self._queue, k, seconds, action, args)

    def _queue(self, k: int, seconds: float, action, args) -> None:
        start = max(self.loop.now, self.free[k])
        self.free[k] = start + seconds
        self.loop.at(start + seconds, action, *args)

    def answer(self, k: int, i: int, target, nbytes: int, signal: Signal, value) -> None:
        """Shard k's answer, part i of `signal`, sent to node `target`."""
        arrival = self.network.send(self.loop.now, ("shard", k), target, nbytes)
        self.loop.at(arrival, signal.give, i, value)

    def pulled(self, k: int, i: int, source, target, signal: Signal) -> None:
        values, version = self.shards[k].pull(source=source, dtype=self.dtype)
        self.answer(k, i, target, _nbytes(values), signal, (values, version))

    def pushed(self, k: int, i: int, part: torch.Tensor, base_version: int, steps: int, errors,
               source, pull: bool, target, signal: Signal) -> None:
        shard = self.shards[k]
        reply = shard.push(part, base_version, steps, errors, source)
        if not pull:
            self.answer(k, i, target, REQUEST_BYTES, signal, reply)
            return
        values, version = shard.pull(source=source, dtype=self.dtype)
        self.answer(k, i, target, REQUEST_BYTES + _nbytes(values), signal,
                    (reply, (values, version)))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class VirtualClient:
    """Node `node`'s server client on the virtual cluster: the `LocalClient` protocol over
    shards `ks` (default: all), whose slices start `offset` elements into the vectors it
    pushes and fetches (a partition's block); each call a `Signal` that is done when every
    shard's answer has arrived."""

    def __init__(self, server: VirtualServer, node, ks: list[int] | None = None,
                 offset: int = 0):
        self.server, self.node, self.offset = server, node, offset
        self.ks = list(range(len(server.shards))) if ks is None else ks

    def fetch(self, source=None) -> Signal:
        s = self.server
        signal = Signal(s.loop, len(self.ks), _join_pulls)
        for i, k in enumerate(self.ks):
            s.send(self.node, k, REQUEST_BYTES, s.pull_s[k], s.pulled, k, i, source, self.node,
                   signal)
        return signal

    def push(self, vector: torch.Tensor, base_versions: list[int], steps: int,
             errors: tuple[float, ...], pull: bool = False, source=None) -> Signal:
        s, o = self.server, self.offset
        signal = Signal(s.loop, len(self.ks), _join_push_pull if pull else list)
        for i, k in enumerate(self.ks):
            shard = s.shards[k]
            part = vector[shard.lo - o:shard.hi - o].clone()  # the replica reuses its memory
            seconds = s.push_s[k] + (s.pull_s[k] if pull else 0.0)
            s.send(self.node, k, _nbytes(part), seconds, s.pushed, k, i, part, base_versions[i],
                   steps, errors, source, pull, self.node, signal)
        return signal


class ProcessClock:
    """A replica's clock on the virtual cluster (`replica.RealClock`'s methods): simulated
    time, and a step's compute takes what `times` (a `costs.StepTimes`) draws (None: a clock
    that never computes a step, a partition's or its head's: their passes are timed by their
    `virtual_partitions.StageMachine`)."""

    def __init__(self, loop: EventLoop, times: StepTimes):
        self.loop, self.times = loop, times

    def now(self) -> float:
        return self.loop.now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.loop.sleep(seconds)

    def computed(self, replica: int, step: int) -> None:
        self.loop.sleep(self.times.next())

    def wait(self, pending, limit: float) -> bool:
        while isinstance(pending, ItemOf):
            pending = pending.pending
        return self.loop.wait(pending, limit)


class VirtualStopwatch:
    """The run's wall time on the simulated clock (`lifecycle.Stopwatch`'s methods): what
    earlier runs took plus the simulated time since `start()`."""

    def __init__(self, before: float, loop: EventLoop):
        self.before, self.loop, self.started = before, loop, None

    def start(self) -> None:
        self.started = self.loop.now

    def stop(self) -> None:
        self.before, self.started = self.seconds, None

    @property
    def seconds(self) -> float:
        return self.before + (0.0 if self.started is None else self.loop.now - self.started)


class VirtualTrainer(LockstepTrainer):
    """Downpour on a virtual cluster (module doc): `VirtualTrainer(config, run_dir).fit()`
    returns the summary dict, with the Downpour trainer's entries, "virtual" (the cost model)
    and "real_wall_s"; its "wall_s" is simulated.

    Raises:
        ConfigError, DataError, CheckpointError: before anything in `run_dir` is written.
        Diverged: a replica's loss, or the server, became NaN or infinite.
    """

    def start(self) -> None:
        c = self.config
        self._start_shards()
        self.loop = EventLoop()
        self.real = time.perf_counter()
        self.costs = self._costs()
        network = Network(*parse_link(c.downpour.virtual_link))
        server = VirtualServer(self.loop, self.shards, network, self.costs["shard_push_s"],
                               self.costs["shard_pull_s"], wire_dtype(c))
        self.network = network
        self.replicas = self._replicas(server)
        self.life.clock = VirtualStopwatch(self.life.clock.seconds, self.loop)
        cut = f" of {c.cluster.partitions} partitions" if self.plan is not None else ""
        self.life.say(f"downpour update: {describe(c)}; {c.cluster.replicas} replicas{cut} and "
                      f"{c.cluster.ps_shards} shards on a virtual cluster: "
                      f"{self.costs['step_s'] * 1e3:.3g} ms a step, links "
                      f"{c.downpour.virtual_link}, "
                      f"{max(self.costs['shard_push_s']) * 1e3:.3g} ms a push")

    def _replicas(self, server: VirtualServer) -> list:
        c, step_s = self.config, self.costs["step_s"]
        # Loaded once for all the replicas, each of which takes its slice.
        arrays = load_arrays(c) if c.data != "imagenet" and c.user is None else None
        if self.plan is not None:  # (a module that imports this one)
            from distbelief.distributed.downpour.virtual_partitions import \
                VirtualPartitionedReplica
            return [VirtualPartitionedReplica(r, c, self.data, self.plan, self.slots, server,
                                              step_s, arrays)
                    for r in range(c.cluster.replicas)]
        # One model copied, not one built and initialised per replica (the first fetch
        # overwrites it).
        model = build_model(c, self.data, self.device)
        return [DownpourReplica(r, c, VirtualClient(server, ("replica", r)),
                                stats=self.data.stats, device=self.device, arrays=arrays,
                                model=copy.deepcopy(model),
                                clock=ProcessClock(self.loop, StepTimes(c, r, step_s)))
                for r in range(c.cluster.replicas)]

    def _layout(self, start, saved: dict | None) -> tuple:
        if self.config.cluster.partitions == 1:
            return super()._layout(start, saved)
        # Shards aligned to the parts, as on Ray (`layout.server_layout`).
        starts, self.plan, slots, retention = server_layout(start, self.data, saved)
        return torch.cat([torch.from_numpy(start_values(s)) for s in starts]), slots, retention

    def _costs(self) -> dict:
        """The cost model's measured or given times (`costs`)."""
        d = self.config.downpour
        measured = [measure_shard(s) for s in self.shards] if d.virtual_shard_ms is None else \
            [(d.virtual_shard_ms / 1e3, 0.0)] * len(self.shards)
        return {"step_s": d.virtual_step_ms / 1e3 if d.virtual_step_ms else self._measure_step(),
                "step_measured": d.virtual_step_ms is None,
                "shard_push_s": [push for push, _ in measured],
                "shard_pull_s": [pull for _, pull in measured],
                "shard_measured": d.virtual_shard_ms is None,
                "link": d.virtual_link, "spread": d.virtual_spread,
                "straggle": d.virtual_straggle, **self._part_shares()}

    def _part_shares(self) -> dict:
        """Partitioned: each part's share of a step's compute (its multiply-adds)."""
        if self.plan is None:
            return {}
        macs = [part.macs for part in self.plan.parts]
        return {"partitions": len(macs),
                "part_shares": [round(m / max(1, sum(macs)), 4) for m in macs]}

    def _measure_step(self) -> float:
        """A step's compute on this machine: a copy of the server's model on a training-sized
        batch cut from the first evaluation batch (the replicas' own batches stay untouched)."""
        c = self.config
        model = copy.deepcopy(self.eval_model())
        x, y = next(iter(next(iter(self.data.splits.values())).batches()))
        rows = torch.arange(c.batch_size) % len(x)
        return measure_step(model, x[rows], y[rows], c)

    def train_steps(self) -> None:
        c, life = self.config, self.life
        self.monitor = ShardMonitor(FailureBook(life, c.cluster.replicas, c.cluster.max_restarts))
        self.work = WorkQueue(self.progress.positions, c.iterations, c.downpour.warmstart_steps,
                              1, 1)
        self.mailbox = [deque() for _ in self.replicas]
        self.ready: list[Signal | None] = [None] * len(self.replicas)
        self.cadence = life.cadences(c, self.steps)
        self.window = ChunkWindow(c.cluster.replicas, c.loss == "cross_entropy")
        life.log({"kind": "virtual", "iteration": self.steps, **self.costs})
        self._hand_out()
        for r in range(len(self.replicas)):
            self.loop.spawn(partial(self._replica_main, r), f"replica {r}")
        life.clock.start()
        try:
            self.loop.run()
        finally:
            self.loop.close()
            life.clock.stop()
        self.save()
        if life.stop_requested and self.steps < c.iterations:
            raise life.interrupted(self.steps)

    def _replica_main(self, r: int) -> None:
        replica = self.replicas[r]
        while (chunk := self._next_chunk(r)) is not None:
            self._finished(chunk, replica.run(chunk[1], chunk[2]))
        replica.drain()

    def _next_chunk(self, r: int) -> tuple | None:
        """Replica r's next step, waiting (in simulated time) while there is none yet (during
        a warmstart); None once there will be none."""
        while not self.mailbox[r]:
            if self.life.stop_requested or self.work.all_handed():
                return None
            self.ready[r] = Signal(self.loop)
            self.loop.wait(self.ready[r])
        return self.mailbox[r].popleft()

    def _hand_out(self) -> None:
        if not self.life.stop_requested:
            for chunk in self.work.take():
                self.mailbox[chunk[0]].append(chunk)
        for r, signal in enumerate(self.ready):
            if signal is not None and (self.mailbox[r] or self.life.stop_requested or
                                       self.work.all_handed()):
                self.ready[r] = None
                signal.set()

    def _finished(self, chunk: tuple, metrics: dict) -> None:
        """Replica chunk[0] trained `chunk`: record, evaluate and checkpoint when due (no
        simulated time passes), hand out what comes next."""
        c = self.config
        self.progress.finished(self.work, chunk, metrics)
        self.window.add(chunk[0], metrics)
        if self.cadence.log.due(self.steps) or self.steps >= c.iterations:
            self._log_train(self.window, self.monitor)
            self.window = ChunkWindow(c.cluster.replicas, c.loss == "cross_entropy")
            self.cadence.log.done(self.steps)
        self._evaluate_and_checkpoint(self.cadence)
        self._hand_out()

    def now(self) -> float:
        return self.loop.now

    def record_extras(self) -> dict:
        return {"real_wall_s": round(time.perf_counter() - self.real, 3)}

    def summary(self) -> dict:
        return {**self._summary(self.statuses()), "virtual": self.costs,
                "network_bytes": self.network.bytes, **self.record_extras()}
