"""What both Downpour drivers (`trainer`, on Ray; `lockstep`, in one process) share: their base
(`DownpourBase`) and the checkpoint generation they write and read. No Ray here.

    checkpoints/gen-N/downpour.pt   the driver's state: replica positions, counters, clock
    checkpoints/gen-N/shard-K.pt    shard K's snapshot (its slice, optimizer state, version)
    checkpoints/gen-N/last.pt       the model the snapshots hold together

Each shard writes its own snapshot into the new generation (`write_piece`) where it sees the
run directory (the driver's machine, or a filesystem shared with it: `sees`), and reads it
back on resume the same way; a shard that does not see it sends its snapshot through the
driver. The driver writes its state and last.pt, then publishes the generation. A
partitioned run's last.pt holds no model but says where it lies (`PIECES`): `load_checkpoint`
assembles the whole model from the shards' files, tensor by tensor, only when it is read.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from distbelief.distributed.downpour.records import summary_entries
from distbelief.distributed.downpour.rules import describe

from distbelief.distributed.flat import BlockFlat, FlatModel, all_finite
from distbelief.distributed.server_model import ServerModel, as_tensors
from distbelief.engine.base import BaseTrainer
from distbelief.engine.checkpoint import PIECES, load_checkpoint, save_checkpoint
from distbelief.engine.lifecycle import Diverged
from distbelief.engine.pieces import MARKER, begin_pieces, fingerprint, sees  # noqa: F401
from distbelief.errors import CheckpointError

STATE = "downpour"  # checkpoints/downpour.pt
DIVERGED = "diverged-history.pt"  # --record-order: the shards' histories when a run diverged
# Fixed for a run's life.
SAME = ("model", "variant", "replicas", "ps_shards", "partitions", "optimizer", "data")


class DownpourBase(BaseTrainer):
    """What both Downpour drivers share: the mode, checkpoint and fixed fields, positions
    counted in minibatches over all replicas (`progress`, a `records.ReplicaProgress`), and
    the evaluation and checkpoint cadence."""

    mode, state, same = "downpour", STATE, SAME
    plan = None  # the partitions' cut (a `pipeline.partition.Plan`), when the replicas are cut

    @property
    def steps(self) -> int:
        """Steps completed over all replicas."""
        return self.progress.steps

    @property
    def replica_threads(self) -> int:
        """The CPU threads a replica computes with (`replay` computes with as many: CPU
        kernels sum in an order that depends on it)."""
        return torch.get_num_threads()

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
            "wall_s": round(self.life.wall_s, 3), **self.record_extras(),
            **window.record(statuses, monitor.rates(statuses, self.now()))})

    def _flat_of(self, model: torch.nn.Module) -> FlatModel | BlockFlat:
        """The server vector's layout over `model`: its parts' blocks when it is cut."""
        return FlatModel(model) if self.plan is None else BlockFlat(self.plan.modules_of(model))

    def train(self) -> None:
        with histories_kept_on_divergence(self, self.shard_snapshots):
            self.train_steps()

    def train_steps(self) -> None:
        """Train from the current position to the config's iterations (`BaseTrainer.train`)."""
        raise NotImplementedError

    def shard_snapshots(self) -> list[dict]:
        """Every shard's `ParameterShard.snapshot` now, in shard order."""
        raise NotImplementedError

    def record_extras(self) -> dict:
        """What this driver adds to each training record (nothing; a virtual run: its real
        wall time)."""
        return {}

    def now(self) -> float:
        """Seconds on the clock the shards' rates are measured by (the machine's)."""
        return time.perf_counter()

    def _summary(self, statuses: list[dict]) -> dict:
        """The summary's Downpour entries from the shards' `statuses`."""
        c = self.config
        return {"replicas": c.cluster.replicas, "ps_shards": c.cluster.ps_shards,
                "optimizer": c.optimizer, "update_rule": describe(c),
                "n_fetch": c.downpour.n_fetch, "n_push": c.downpour.n_push,
                "local_steps": c.downpour.local_steps,
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
        "partition_bounds": bounds, "replica_threads": trainer.replica_threads}, files,
        trainer.steps)
    forget_divergence(trainer)


def write_piece(snapshot: dict, path: str | os.PathLike) -> dict:
    """Shard snapshot `snapshot` written (atomically) as its file of a generation; returns
    {"finite": whether its values are all finite}."""
    save_checkpoint(path, {"shard": as_tensors(snapshot)})
    return {"finite": all_finite(torch.from_numpy(np.asarray(snapshot["w"])))}


def check_pieces(trainer, written: list[dict]) -> None:
    """Raise `Diverged` unless every shard's values are finite (`written`: their
    `write_piece` replies): a server holding NaN or Inf never replaces a good checkpoint."""
    if not all(w["finite"] for w in written):
        raise Diverged(f"the server's parameters are not finite at iteration {trainer.steps}; "
                       f"lower --lr (the last checkpoint is kept)")


def read_pieces(files: list[Path]) -> torch.Tensor:
    """The server's vector, read back from its shards' files (in shard order)."""
    return torch.cat([load_checkpoint(f)["shard"]["w"] for f in files])


def publish_pieces(trainer, folder: Path, shards: int, model: dict) -> None:
    """Publish the generation in `folder`, where the `shards` shards wrote their snapshots,
    with `model` as last.pt (the model as a checkpoint, or `pieces_index`)."""
    (folder / MARKER).unlink(missing_ok=True)  # the shards are done with it
    trainer.life.save_generation(trainer.config, {
        **trainer.progress.state(), "data_stats": trainer.data.stats,
        "partition_bounds": trainer.plan.bounds if trainer.plan else None,
        "replica_threads": trainer.replica_threads}, {"last": model},
        trainer.steps, folder=folder,
        pieces=tuple(f"{snapshot_name(k)}.pt" for k in range(shards)))
    forget_divergence(trainer)


def pieces_index(trainer, folder: Path) -> dict:
    """last.pt of a partitioned run: everything `distbelief.load` needs but the model, and
    where the model is (`PIECES`: the generation folder, the cut, each shard's file and
    slice of the server's vector)."""
    return {"config": trainer.config.to_dict(), "iteration": trainer.steps,
            "data_stats": trainer.data.stats, "num_classes": trainer.data.num_classes,
            "in_chans": trainer.data.in_chans, "wall_s": trainer.life.wall_s,
            "mode": "downpour",
            PIECES: {"folder": folder.name, "bounds": list(trainer.plan.bounds),
                     "shards": [[f"{snapshot_name(k)}.pt", s.lo, s.hi]
                                for k, s in enumerate(trainer.slots)]}}


@contextmanager
def histories_kept_on_divergence(trainer, snapshots):
    """Around training: when it raises `Diverged` under --record-order, write the shards'
    histories (from `snapshots()`, the shards' `snapshot`s now) to the run folder's
    `DIVERGED`, so that `distbelief replay` can re-execute the run up to where its server
    stopped being finite (no checkpoint ever holds that server: the last good one is kept,
    and its history ends there). The values are not written: the replay recomputes them."""
    try:
        yield
    except Diverged:
        if trainer.config.downpour.record_order and trainer.life.run is not None:
            path = trainer.life.run.path / DIVERGED
            try:
                taken = snapshots()
                save_checkpoint(path, {
                    # As a checkpoint counts: the minibatches every shard has received.
                    "steps": min(snap["steps"] for snap in taken),
                    "data_stats": trainer.data.stats,
                    "replica_threads": trainer.replica_threads,
                    "histories": [[tuple(op) for op in snap["history"]] for snap in taken],
                    "bases": [snap.get("history_base", 0) for snap in taken]})
                trainer.life.say(f"the shards' histories up to the divergence: {path} "
                                 f"(distbelief replay)")
            except Exception as e:  # the divergence is the error to report, not this
                trainer.life.say(f"could not keep the shards' histories ({e})")
        raise


def forget_divergence(trainer) -> None:
    """A generation written after a divergence (a resumed run went past it): the histories
    kept then are not the run's any more."""
    if trainer.life.run is not None:
        (trainer.life.run.path / DIVERGED).unlink(missing_ok=True)
