"""What both Downpour drivers (`trainer`, on Ray; `lockstep`, in one process) share: their base
(`DownpourBase`) and the checkpoint generation they write and read. No Ray here.

    checkpoints/gen-N/downpour.pt   the driver's state: replica positions, counters, clock
    checkpoints/gen-N/shard-K.pt    shard K's snapshot (its slice, optimizer state, version)
    checkpoints/gen-N/last.pt       the model the snapshots hold together
"""

from __future__ import annotations

import time

import numpy as np
import torch

from distbelief.distributed.downpour.records import summary_entries
from distbelief.distributed.downpour.rules import describe

from distbelief.distributed.server_model import ServerModel, as_tensors
from distbelief.engine.base import BaseTrainer
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.errors import CheckpointError

STATE = "downpour"  # checkpoints/downpour.pt
# Fixed for a run's life.
SAME = ("model", "variant", "replicas", "ps_shards", "partitions", "optimizer", "data")


class DownpourBase(BaseTrainer):
    """What both Downpour drivers share: the mode, checkpoint and fixed fields, positions
    counted in minibatches over all replicas (`progress`, a `records.ReplicaProgress`), and
    the evaluation and checkpoint cadence."""

    mode, state, same = "downpour", STATE, SAME

    @property
    def steps(self) -> int:
        """Steps completed over all replicas."""
        return self.progress.steps

    @property
    def position(self) -> int:
        return self.steps

    @property
    def examples(self) -> int:
        return self.steps * self.config.batch_size

    def _log_window(self, window, statuses: list[dict], monitor) -> None:
        """The training record of `window` (a `records.ChunkWindow`), with the shards'
        `statuses` and their rates since the last record (`monitor`, a `ShardMonitor`)."""
        self.life.log_train({
            "kind": "train", "iteration": self.steps, "examples": self.examples,
            "epoch": round(self.examples / self.data.train_size, 4),
            "wall_s": round(self.life.wall_s, 3),
            **window.record(statuses, monitor.rates(statuses, time.perf_counter()))})

    def _summary(self, statuses: list[dict]) -> dict:
        """The summary's Downpour entries from the shards' `statuses`."""
        c = self.config
        return {"replicas": c.cluster.replicas, "ps_shards": c.cluster.ps_shards,
                "optimizer": c.optimizer, "update_rule": describe(c),
                "n_fetch": c.downpour.n_fetch, "n_push": c.downpour.n_push,
                **summary_entries(statuses, self.life.counters, self.progress.replica_images,
                                  self.progress.replica_seconds, self.progress.time_split,
                                  self.life.wall_s)}

    def _evaluate_and_checkpoint(self, cadence) -> None:
        if cadence.eval.due(self.steps):
            self.life.evaluate(self)
            cadence.eval.done(self.steps)
        if cadence.checkpoint.due(self.steps):
            self.save()
            cadence.checkpoint.done(self.steps)


def snapshot_name(k: int) -> str:
    return f"shard-{k}"  # checkpoints/shard-K.pt


def check_snapshots(run, shards: int) -> None:
    """Raise `CheckpointError` unless every shard's snapshot is in the run directory."""
    missing = [k for k in range(shards) if not run.state_file(snapshot_name(k)).is_file()]
    if missing:
        raise CheckpointError(f"{run.path} lacks the snapshot of shard(s) "
                              f"{', '.join(map(str, missing))}")


def load_snapshot(run, k: int) -> dict:
    """Shard k's snapshot in the checkpoint `run` resumes from."""
    return load_checkpoint(run.state_file(snapshot_name(k)))["shard"]


def save_generation(trainer, snapshots: list[dict], bounds) -> None:
    """One generation of `trainer` (its `life`, `config`, `server`, `progress`, `data`,
    `steps`) from its shards' `snapshots` (`ParameterShard.snapshot`, in shard order);
    `bounds`: the partition cut, or None. A server holding NaN or Inf never replaces a good
    checkpoint (`Diverged`)."""
    vector = torch.from_numpy(np.concatenate([snap["w"] for snap in snapshots]))
    ServerModel.check_finite(vector, trainer.steps)
    files = {snapshot_name(k): {"shard": as_tensors(snap)} for k, snap in enumerate(snapshots)}
    files["last"] = trainer.server.checkpoint(vector, trainer.steps, trainer.life.wall_s,
                                              "downpour")
    trainer.life.save_generation(trainer.config, {
        **trainer.progress.state(), "data_stats": trainer.data.stats,
        "partition_bounds": bounds}, files, trainer.steps)
