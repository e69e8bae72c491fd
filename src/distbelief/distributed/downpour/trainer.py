"""The Downpour driver: starts the shards and replicas on Ray, hands out work, evaluates the
server's parameters, records metrics, checkpoints and recovers from failures.

The driver never holds the training state: parameters live on the shards and only pass through
the driver when it evaluates or checkpoints. It hands each replica chunks of `CHUNK_STEPS` of
its own steps (the decisions are `WorkQueue`'s); a replica that finishes one gets the next,
until the steps of all replicas together reach `iterations`. So fast replicas do more, a dead
replica only stops its own work, and the driver can evaluate, log and checkpoint while replicas
keep training (each replica has up to two chunks queued, so it never idles while the driver is
busy). The run directory, cadence, signals, failure book and summary are the shared
`RunLifecycle`'s; calls to the replicas go through `runtime.calls.ReplicaCalls`.

Run directory (on top of the single-process layout, see `engine/rundir.py`): a checkpoint is
one generation, published by checkpoints/manifest.json once all its files are written:

    checkpoints/gen-N/downpour.pt   the driver's state: replica positions, counters, clock
    checkpoints/gen-N/shard-K.pt    shard K's snapshot (its slice, optimizer state, version)
    checkpoints/gen-N/last.pt       the model the snapshots hold together
    checkpoints/last.pt             a copy of it, loadable by `distbelief eval`

Only the driver writes, so the run directory need not be on storage the other nodes see.
Between checkpoints each shard sends a snapshot every --snapshot-every-s to the keeper on the
driver's node (`distributed.keeper`), from which Ray restarts it after a failure, on another
node if its node is lost: at most that window of updates is lost (reported).
"""

from __future__ import annotations

import os

import torch

from distbelief.distributed.downpour import bound
from distbelief.distributed.downpour.actors import (ClockActor, PartitionedReplicaActor,
                                                    ReplicaActor, ServerEval, ServerStageActor,
                                                    ShardActor, server_vector)
from distbelief.distributed.downpour.generation import (
    MARKER, DownpourBase, begin_pieces, check_pieces, check_snapshots, fingerprint,
    load_snapshot, pieces_index, publish_pieces, read_pieces, snapshot_name, write_piece)
from distbelief.distributed.downpour.layout import ShardSlot, plain_layout, server_layout
from distbelief.distributed.downpour.records import (ChunkWindow, ReplicaProgress,
                                                     ShardMonitor, partition_summary)
from distbelief.distributed.downpour.replica import FetchWait
from distbelief.distributed.downpour.rules import describe
from distbelief.distributed.downpour.shard import shard_lost
from distbelief.distributed.downpour.statistics import buffer_slice
from distbelief.distributed.downpour.work import WorkQueue
from distbelief.distributed.pipeline import Plan
from distbelief.distributed.runtime.calls import ReplicaCalls, get, wait_briefly
from distbelief.distributed.runtime.cluster import granted_device, replica_options, wait_started
from distbelief.distributed.runtime.session import DriverSession
from distbelief.distributed.server_model import ServerModel
from distbelief.engine.config import TrainConfig, check_model
from distbelief.engine.failures import FailureBook
from distbelief.engine.setup import build_model

CHUNK_STEPS = 10  # replica steps per work request (WorkQueue)
QUEUED_CHUNKS = 2  # chunks queued per replica, so it keeps training while the driver is busy
POLL_S = 0.5  # longest wait for a result before the driver checks its clocks


class DownpourTrainer(DownpourBase):
    """Downpour SGD: `DownpourTrainer(config, run_dir).fit()` returns the summary dict.

    `address` joins a Ray cluster; without it a local Ray is started and shut down at the end
    (unless Ray is already initialized in this process, as in tests). `request_stop()` (from a
    signal handler or another thread) makes it stop handing out work, let the replicas finish
    their chunks, checkpoint, and raise `TrainingInterrupted`.

    Raises:
        ConfigError, DataError, CheckpointError: before anything in `run_dir` is written.
        Diverged: a replica's loss became NaN or infinite (`ReplicaProgress.finished`).
        DistbeliefError: every replica failed more than `max_restarts` times, or a shard did.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        self.session = DriverSession(address, dashboard, config.cluster.connect_timeout_s)
        saved = self.open_run(config, run_dir, resume=resume, progress=progress)
        if saved:
            check_snapshots(self.life.run, self.config.cluster.ps_shards)
        # A resumed run's shards restore their snapshots: --init-from is not read again.
        start = self.config.replace(init_from=None) if saved else self.config
        self.plan: Plan | None = None
        if self.config.cluster.partitions > 1:  # shards aligned to the parts (`partitioned`)
            # Each shard's start: an array, or a `PartSlice` the shard computes itself.
            self.starts, self.plan, self.slots, self.retention = server_layout(
                start, self.data, saved)
        else:
            initial, self.slots, self.retention = plain_layout(start, self.data)
            self.starts = [initial[s.lo:s.hi].numpy() for s in self.slots]
        check_model(self.config, values=self.slots[-1].hi)
        self.bounds = [(s.lo, s.hi) for s in self.slots]
        # Partitioned, a registry model is never whole here: evaluated by the partitions
        # (`ServerEval`), checkpointed as its shards' pieces (`generation`). Else the
        # driver's model evaluates and checkpoints (it is built for that alone).
        self.piecewise = self.plan is not None and self.config.user is None and \
            not self.config.bn_recalibrate
        self.server = ServerModel(self.config, self.data, self.device, flat_of=self._flat_of)
        self.progress = ReplicaProgress(self.config.cluster.replicas, saved)
        self.resumed_shards = saved is not None

    @property
    def replica_threads(self) -> int:
        return self.shape.threads

    # --- what the lifecycle calls ------------------------------------------------------

    def start(self) -> None:
        """Ray, then the shards (loading their snapshots on resume) and the replicas, once all
        of them are placed and answer."""
        self.life.say(f"downpour update: {describe(self.config)}; a replica "
                      f"{FetchWait.describe(self.config)}; {bound.describe(self.config)}")
        self.session.start()
        self.server.move_to(granted_device())
        self.data, self.device = self.server.data, self.server.device
        self._start_shards()
        self._start_replicas()
        get(self.shards_started)
        self.shards_started = None
        self.placed = wait_started(self.session.replicas, self.shape)

    def _start_shards(self) -> None:
        c, session = self.config, self.session
        self.shard_names = [session.name(f"shard-{k}") for k in range(c.cluster.ps_shards)]
        session.shards = [
            ShardActor.options(name=name, max_restarts=c.cluster.max_restarts,
                               max_task_retries=-1, scheduling_strategy=strategy).remote(
                k, slot.lo, slot.hi, slot.param_end, c, session.keeper_name,
                buffer_slice(self.retention, slot.lo, slot.hi, slot.param_end).numpy())
            for k, (slot, name, strategy) in enumerate(
                zip(self.slots, self.shard_names, session.place_shards(len(self.slots))))]
        # Replicas start (a few seconds each) while the shards load; work waits for both.
        if self.resumed_shards:  # each reads its own snapshot, where it sees the file
            run = self.life.run
            files = [run.state_file(snapshot_name(k)) for k in range(len(session.shards))]
            seen = get([s.sees.remote(str(f), fingerprint(f))
                        for s, f in zip(session.shards, files)])
            self.shards_started = [
                s.start.remote(state_file=str(f)) if sees_it else
                s.start.remote(state=load_snapshot(run, k))
                for k, (s, f, sees_it) in enumerate(zip(session.shards, files, seen))]
        else:
            self.shards_started = [s.start.remote(start)
                                   for s, start in zip(session.shards, self.starts)]
        # Ray copied the values into its object store: the shards hold them from here on.
        self.starts = None

    def _start_replicas(self) -> None:
        c, clock_name = self.config, self._start_clocks()
        if self.plan is not None:
            self.shape = start_partitioned(self.session, c, self.plan, self.slots,
                                           self.shard_names, self.data, clock_name)
            return
        options, self.shape = replica_options(c)
        self.session.replicas = [ReplicaActor.options(**options).remote(
            r, c, self.shard_names, self.bounds, self.data.stats, self.shape.threads,
            self.shape.device, clock_name) for r in range(c.cluster.replicas)]

    def _start_clocks(self) -> str | None:
        """--ssp-bound's clock actor (its name, which the replicas find it by), or None."""
        self.clocks = None
        if self.config.downpour.ssp_bound is None:
            return None
        name = self.session.name("clocks")
        self.clocks = ClockActor.options(name=name, max_restarts=-1,
                                         max_task_retries=-1).remote(
            self.config.downpour.ssp_bound)
        self.session.others.append(self.clocks)
        return name

    def close(self) -> None:
        if self.config.downpour.snapshot_store == "disk" and self.session.shards:
            # Best effort: a dead shard's file stays (in the machine's temporary folder).
            wait_briefly([s.forget.remote() for s in self.session.shards], 30.0)
        self.session.close()

    def eval_model(self) -> torch.nn.Module:
        if self.piecewise:  # replica 0's partitions, on copies of their parts
            return ServerEval(self.session.stages[:self.config.cluster.partitions],
                              self.config.cluster.micro_batches, shard_lost(self.config))
        return self.server.load(server_vector(self.session.shards))

    def trained_model(self) -> torch.nn.Module | None:
        """As `BaseTrainer.trained_model`; a piecewise run's is assembled from its last
        checkpoint when asked (None without a run directory)."""
        if not self.piecewise:
            return super().trained_model()
        from distbelief.api import load

        return None if self.life.run is None else load(self.life.run.path)

    # --- the loop ---------------------------------------------------------------------------

    def train_steps(self) -> None:
        c, life = self.config, self.life
        self.monitor = ShardMonitor(FailureBook(life, c.cluster.replicas,
                                                c.cluster.max_restarts))
        self._log_cluster(self.placed)
        work = WorkQueue(self.progress.positions, c.iterations, c.downpour.warmstart_steps,
                         CHUNK_STEPS, QUEUED_CHUNKS)
        calls = ReplicaCalls(
            self.session.replicas, self.monitor.book, lost=shard_lost(c),
            position=lambda: self.steps, on_recovered=work.resume,
            on_failure=lambda r, tags, restarted: self._replica_failed(work, r, tags, restarted))
        classifies = c.loss == "cross_entropy"
        cadence, window = life.cadences(c, self.steps), ChunkWindow(c.cluster.replicas, classifies)
        released = work.completed >= c.downpour.warmstart_steps
        life.clock.start()
        try:
            self._hand_out(work, calls)
            while not calls.empty:
                for _, chunk, metrics in calls.wait(POLL_S):
                    self.progress.finished(work, chunk, metrics)
                    window.add(chunk[0], metrics)
                released = released or self._release()
                if cadence.log.due(self.steps) or (not calls.inflight and window.sums["steps"]):
                    self._log_train(window)
                    window = ChunkWindow(c.cluster.replicas, classifies)
                    cadence.log.done(self.steps)
                self._hand_out(work, calls)
                self._evaluate_and_checkpoint(cadence)
            get([r.drain.remote() for k, r in enumerate(self.session.replicas) if work.alive[k]])
        finally:
            life.clock.stop()
        self.save()
        if life.stop_requested and self.steps < c.iterations:
            raise life.interrupted(self.steps)

    def _hand_out(self, work: WorkQueue, calls: ReplicaCalls) -> None:
        if not self.life.stop_requested:
            for chunk in work.take():
                r, start, steps = chunk
                calls.submit(r, "run", start, steps, tag=chunk)
        if self.clocks is not None and (self.life.stop_requested or work.all_handed()):
            # Nothing more to hand out: a replica waiting for one that has no work left
            # would wait for ever.
            self.clocks.release.remote()
            self.clocks = None

    def _replica_failed(self, work: WorkQueue, r: int, tags: list, restarted: bool) -> None:
        """Replica r died (counted by the book): its chunks are handed out again from its last
        completed step; a restarted replica waits for Ray (paused) until it answers."""
        self.life.counters["replica_steps_lost"] += tags[0][2] if tags[0] else 0
        work.failed(r, give_up=not restarted)
        if self.clocks is not None:  # it holds nobody back until it trains again
            self.clocks.leave.remote(r)
        if restarted:
            work.pause(r)
        else:  # gone for good: its momentum leaves every shard's look-ahead
            get([s.retire.remote(r) for s in self.session.shards], shard_lost(self.config))

    def _release(self) -> bool:
        """Whether the warmstart is over; logs the moment it ends (the others get work)."""
        if self.steps < self.config.downpour.warmstart_steps:
            return False
        self.life.log({"kind": "release", "iteration": self.steps,
                       "positions": list(self.progress.positions)})
        return True

    # --- records and checkpoints ------------------------------------------------------------

    def _poll_shards(self) -> list[dict]:
        statuses = get([s.status.remote() for s in self.session.shards])
        return self.monitor.observe(statuses, self.steps)

    def _log_cluster(self, replicas: list[dict]) -> None:
        self.life.log({"kind": "cluster", "iteration": self.steps, "replicas": replicas,
                       "shards": [{k: st[k] for k in ("shard", "node", "elements")}
                                  for st in self._poll_shards()]})

    def _log_train(self, window: ChunkWindow) -> None:
        self._log_window(window, self._poll_shards(), self.monitor)

    def shard_snapshots(self) -> list[dict]:
        return get([s.snapshot.remote() for s in self.session.shards], shard_lost(self.config))

    def save(self) -> None:
        """One checkpoint generation (`generation`): each shard writes its snapshot (or sends
        it here when it does not see the run directory), then this process writes last.pt
        (the model read back from those files, or where they lie when piecewise) and its
        state, and publishes them. A server holding NaN or Inf never replaces a good
        checkpoint."""
        if self.life.run is None:
            return
        folder, seen = begin_pieces(self.life.run)
        try:
            files = [folder / f"{snapshot_name(k)}.pt" for k in range(len(self.slots))]
            written = get([s.write_piece.remote(str(f), str(folder / MARKER), seen)
                           for s, f in zip(self.session.shards, files)],
                          shard_lost(self.config))
            for k, reply in enumerate(written):
                if reply is None:  # the shard does not see the run directory: through here
                    written[k] = write_piece(get(self.session.shards[k].snapshot.remote(),
                                                 shard_lost(self.config)), files[k])
            check_pieces(self, written)
            model = pieces_index(self, folder) if self.piecewise else self.server.checkpoint(
                read_pieces(files), self.steps, self.life.wall_s, "downpour")
            publish_pieces(self, folder, len(files), model)
        except BaseException:
            self.life.run.discard(folder)
            raise

    def summary(self) -> dict:
        statuses = self._poll_shards()
        out = self._summary(statuses)
        if self.plan is not None:
            out.update(partition_summary(statuses, self.slots, self.config.cluster.partitions))
        return out


def start_partitioned(session, config, plan: Plan, slots: list[ShardSlot],
                      shard_names: list[str], data, clock_name: str | None = None):
    """Start R x P partition actors (each reaching only the shards of its part) and R heads
    into `session` (`session.stages`, `session.replicas`; the heads find --ssp-bound's clocks
    by `clock_name`); returns the partitions' shape. The parts travel built on the meta
    device: their values come from the shards."""
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
        ServerStageActor.options(name=names[r][p], **options).remote(
            p, parts, modules[p], c, shape.threads, shape.device, *servers[p], r)
        for r in range(replicas) for p in range(parts)]
    session.replicas = [PartitionedReplicaActor.options(
        max_restarts=c.cluster.max_restarts, max_task_retries=0).remote(
        r, c, names[r], data.stats, clock_name) for r in range(replicas)]
    return shape
