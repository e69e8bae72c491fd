"""Downpour in lockstep (--lockstep): N replicas in one process, one step each in turn, against
the real shards and update rules. No Ray here.

Replica r computes its gradient on the parameters that came back with its own last push; the
other N - 1 replicas push before it pushes again, so every gradient after the first round is
exactly N - 1 versions stale, and the run is a pure function of the config: repeated, it ends
with the same parameters bit for bit (CPU, --deterministic). It is how a laptop studies what
16 or 64 replicas do to an update rule, with the staleness fixed instead of whatever the
machine's timing gives. The shards, rules, replicas (`DownpourReplica` over a `LocalClient`),
n_fetch / n_push, warmstart, records, checkpoints (the Ray driver's generations,
`generation`) and run directory are those of a Ray run; only the timing is not.

A checkpoint holds the shards; the replicas' in-flight state (the parameters each fetched, a
push being accumulated, dana-slim's momentum) is not in it, so a resumed run's replicas start
with a fresh fetch: the first round after a resume is less stale than N - 1.
"""

from __future__ import annotations

import os

import torch

from distbelief.distributed.downpour.generation import (DownpourBase, check_snapshots,
                                                        load_snapshot, save_generation)
from distbelief.distributed.downpour.layout import plain_layout
from distbelief.distributed.downpour.records import (ChunkWindow, ReplicaProgress,
                                                     ShardMonitor)
from distbelief.distributed.downpour.replica import DownpourReplica, LocalClient
from distbelief.distributed.downpour.rules import describe
from distbelief.distributed.downpour.shard import ParameterShard, local_shards
from distbelief.distributed.downpour.work import WorkQueue
from distbelief.distributed.server_model import ServerModel
from distbelief.engine.config import TrainConfig, check_model
from distbelief.engine.failures import FailureBook


class LockstepTrainer(DownpourBase):
    """Downpour with its replicas in lockstep (module doc): `LockstepTrainer(config,
    run_dir).fit()` returns the summary dict, with the Downpour trainer's entries.

    Raises:
        ConfigError, DataError, CheckpointError: before anything in `run_dir` is written.
        Diverged: a replica's loss, or the server, became NaN or infinite.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False):
        saved = self.open_run(config, run_dir, resume=resume, progress=progress)
        if saved:
            check_snapshots(self.life.run, self.config.cluster.ps_shards)
        start = self.config.replace(init_from=None) if saved else self.config
        self.initial, self.slots, self.retention = self._layout(start, saved)
        check_model(self.config, values=self.initial.numel())
        self.server = ServerModel(self.config, self.data, self.device, flat_of=self._flat_of)
        self.progress = ReplicaProgress(self.config.cluster.replicas, saved)
        self.resumed_shards = saved is not None
        self.shards: list[ParameterShard] = []
        self.replicas: list[DownpourReplica] = []

    def _layout(self, start: TrainConfig, saved: dict | None) -> tuple:
        """(the initial server vector, the shards' slots, the buffers' retention)."""
        return plain_layout(start, self.data)

    def start(self) -> None:
        c = self.config
        self.life.say(f"downpour update: {describe(c)}; {c.cluster.replicas} replicas in "
                      f"lockstep (staleness {c.cluster.replicas - 1}), in this process")
        self._start_shards()
        client = LocalClient(self.shards)
        self.replicas = [DownpourReplica(r, c, client, stats=self.data.stats, device=self.device)
                         for r in range(c.cluster.replicas)]

    def _start_shards(self) -> None:
        """The shards, in this process (restored from the checkpoint on resume)."""
        self.shards = local_shards(self.config, self.initial, self.slots, self.retention)
        if self.resumed_shards:
            for k, shard in enumerate(self.shards):
                shard.restore(load_snapshot(self.life.run, k))
        self.initial = None

    def eval_model(self) -> torch.nn.Module:
        return self.server.load(torch.cat([s.pull()[0] for s in self.shards]))

    def statuses(self) -> list[dict]:
        """The shards' `stats`, as the Ray driver's shard statuses read (one incarnation)."""
        return [{**s.stats(), "incarnation": "lockstep", "restored_version": None}
                for s in self.shards]

    def train_steps(self) -> None:
        c, life = self.config, self.life
        monitor = ShardMonitor(FailureBook(life, c.cluster.replicas, c.cluster.max_restarts))
        # One step per replica in turn: chunks of 1, one queued each (`WorkQueue` hands them
        # out replica after replica, and only replica 0 during a warmstart).
        work = WorkQueue(self.progress.positions, c.iterations, c.downpour.warmstart_steps, 1, 1)
        classifies = c.loss == "cross_entropy"
        cadence = life.cadences(c, self.steps)
        window = ChunkWindow(c.cluster.replicas, classifies)
        life.clock.start()
        try:
            while not life.stop_requested and (chunks := work.take()):
                for chunk in chunks:  # a round: every replica one step, in turn
                    r = chunk[0]
                    metrics = self.replicas[r].run(chunk[1], chunk[2])
                    self.progress.finished(work, chunk, metrics)
                    window.add(r, metrics)
                    if cadence.log.due(self.steps) or self.steps >= c.iterations:
                        self._log_train(window, monitor)
                        window = ChunkWindow(c.cluster.replicas, classifies)
                        cadence.log.done(self.steps)
                    self._evaluate_and_checkpoint(cadence)
        finally:
            life.clock.stop()
        for replica in self.replicas:  # a round cut short by the end or a stop, pushed
            replica.drain()
        self.save()
        if life.stop_requested and self.steps < c.iterations:
            raise life.interrupted(self.steps)

    def _log_train(self, window: ChunkWindow, monitor: ShardMonitor) -> None:
        if not window.sums["steps"]:
            return
        self._log_window(window, monitor.observe(self.statuses(), self.steps), monitor)

    def shard_snapshots(self) -> list[dict]:
        return [s.snapshot() for s in self.shards]

    def save(self) -> None:
        if self.life.run is not None:
            save_generation(self, self.shard_snapshots(),
                            None if self.plan is None else self.plan.bounds)

    def summary(self) -> dict:
        return {**self._summary(self.statuses()), "lockstep": True}
