"""`--mode sync`: synchronous data parallelism on Ray Train, under the run lifecycle every mode
shares (run directory, records, evaluations, checkpoints, --resume, SIGTERM).

Ray Train's `TorchTrainer` runs N workers with DistributedDataParallel (`sync.worker` states
the batch semantics); `fit()` blocks, so it runs in a thread of the driver while the driver's
main thread takes the workers' events from the hub as they come (`sync.hub`): it logs their
training records, evaluates and writes into the run directory the state rank 0 hands over, and
passes a stop request on. The run directory's checkpoint is an ordinary single-process
checkpoint (checkpoints/last.pt), so `distbelief eval` and `distbelief.load` read it as any
other.

What a run continues from is Ray Train's own checkpoint: the workers report one at every
checkpoint step (`ray.train.report`), Ray Train keeps it in its storage (RUN_DIR/ray-train, or
a folder under --train-storage for clusters whose nodes do not share the run directory), and
a worker group restarted after a loss (up to --max-restarts times) or a run resumed later
starts from the latest (`ray.train.get_checkpoint`). The driver then drops the records after
that checkpoint (they will be written again), or writes the ones it had not heard of (each
checkpoint holds the run's records), and counts and logs a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch

from distbelief.distributed.placement import replica_shape
from distbelief.distributed.runtime.calls import get
from distbelief.distributed.runtime.cluster import kill, nodes
from distbelief.distributed.runtime.startup import ray_session
from distbelief.distributed.sync.actors import HubActor, fit_workers
from distbelief.engine.base import BaseTrainer
from distbelief.engine.config import TrainConfig
from distbelief.engine.lifecycle import Diverged, describe
from distbelief.engine.setup import build_model
from distbelief.errors import DistbeliefError

STATE = "last"  # the state is the ordinary checkpoint, as in single mode
SAME = ("model", "variant", "replicas", "batch_size")  # what a resume must keep
WAIT_S = 0.5  # longest wait for the workers' next event before the driver looks again


class SyncTrainer(BaseTrainer):
    """Trains `config` with `config.cluster.replicas` synchronous workers (`fit()` returns the
    summary).

    Raises:
        ConfigError, DataError, CheckpointError: before anything is written.
        Diverged: the loss became NaN or infinite (the last checkpoint stays).
        DistbeliefError: a worker failed more than --max-restarts times."""

    mode, state, same = "sync", STATE, SAME

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        self.saved = self.open_run(config, run_dir, resume=resume, progress=progress)
        self.address, self.dashboard = address, dashboard
        # The driver evaluates on the CPU.
        self.model = build_model(self.config, self.data, self.device)
        if self.saved is not None:
            self.model.load_state_dict(self.saved["model"])
        self.iteration = self.saved["iteration"] if self.saved else 0
        self.train_s = self.saved["train_s"] if self.saved else 0.0
        self.storage = self._storage()
        self.scratch: str | None = None  # Ray Train's storage when there is no run directory
        self.session = self.hub = self.thread = self.shape = None
        self.outcome: BaseException | None = None
        self.diverged: dict | None = None
        self.attempts = 0
        self.state_at: int | None = None  # the iteration of the last state handled
        self.hub_name = f"distbelief-{uuid.uuid4().hex[:12]}-hub"

    def _storage(self) -> str | None:
        """Where Ray Train keeps this run's checkpoints: where it kept them before (a resumed
        run), a new folder under --train-storage, or RUN_DIR/ray-train; None: a temporary
        folder (no run directory)."""
        if self.saved is not None and self.saved.get("train_storage"):
            return self.saved["train_storage"]
        root = self.config.cluster.train_storage
        if root:
            root = root if "://" in root else str(Path(root).resolve())
            return f"{root.rstrip('/')}/distbelief-{uuid.uuid4().hex[:12]}"
        return None if self.life.run is None else str(self.life.run.path.resolve() / "ray-train")

    # --- what the lifecycle calls ------------------------------------------------------

    @property
    def position(self) -> int:
        return self.iteration

    @property
    def examples(self) -> int:
        return self.iteration * self.config.batch_size * self.config.cluster.replicas

    def start(self) -> None:
        """Ray, the hub and the workers' shape."""
        session = ray_session(self.address, self.dashboard,
                              self.config.cluster.connect_timeout_s)
        session.__enter__()
        self.session = session  # entered: `close` leaves it
        self.shape = replica_shape(self.config, nodes())
        if self.storage is None:
            self.scratch = tempfile.mkdtemp(prefix="distbelief-sync-")
            self.storage = f"{self.scratch}/ray-train"
        self.hub = HubActor.options(name=self.hub_name).remote()
        get(self.hub.status.remote())

    def train(self) -> None:
        self.thread = threading.Thread(target=self._fit_workers, name="ray-train", daemon=True)
        self.life.clock.start()
        try:
            self.thread.start()
            while self.thread.is_alive():
                self._handle(get(self.hub.take.remote(WAIT_S)))
                if self.life.stop_requested:  # repeated: a restarted hub forgets it
                    self.hub.request_stop.remote()
            self._handle(get(self.hub.take.remote(0)))
        finally:
            self.life.clock.stop()
        self._finish()

    def _fit_workers(self) -> None:
        initial = None if self.saved is None else _training_state(self.saved)
        try:
            fit_workers(self.config, self.hub_name, self.data.stats, self.shape, self.storage,
                        initial)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.outcome = e

    def _handle(self, events: list[dict]) -> None:
        life = self.life
        for e in events:
            if e["kind"] == "attempt":
                self._attempt(e["iteration"], e["records"])
            elif self._stale(e):
                # Ray re-sends the calls that were in flight when a hub died, out of order and
                # maybe twice: an event behind what the driver has is dropped, not logged twice.
                life.counters["hub_events_dropped"] += 1
            elif e["kind"] == "train":
                self.iteration = e["record"]["iteration"]
                life.log_train({**e["record"], "wall_s": round(life.wall_s, 3)})
            elif e["kind"] == "state":
                self._state(e)
            elif e["kind"] == "diverged":
                self.diverged = e

    def _stale(self, event: dict) -> bool:
        if event["kind"] == "train":
            return event["record"]["iteration"] <= self.iteration
        if event["kind"] == "state":
            return event["iteration"] < self.iteration or event["iteration"] == self.state_at
        return False

    def _state(self, event: dict) -> None:
        """Rank 0's state at `event["iteration"]`: evaluated and/or written as last.pt."""
        self.iteration, state = event["iteration"], event["state"]
        self.state_at = self.iteration
        self.model.load_state_dict(state["model"])
        self.train_s = state["train_s"]
        if event["evaluate"]:
            self.life.evaluate(self)
        if event["checkpoint"]:
            self.life.save_state(self.config, self._checkpoint(state))

    def _attempt(self, iteration: int, records: list[dict]) -> None:
        """The workers (re)started from Ray Train's checkpoint at `iteration`, which holds the
        run's training records up to it (`records`): the records after it are dropped (they
        will be written again), or, for a checkpoint the driver never heard of (it was killed
        first, or the hub lost its events), the records it had missed are written; every start
        after the first is a failure."""
        life, lost = self.life, max(self.iteration - iteration, 0)
        self.attempts, self.state_at = self.attempts + 1, None
        if iteration < self.iteration and life.run is not None:
            life.run.truncate_metrics(iteration)
        for record in records:
            if record["iteration"] > self.iteration:
                life.log_train(record)
        life.counters["steps_lost"] += lost
        if self.attempts > 1:
            life.counters["worker_failures"] += 1
            life.log({"kind": "failure", "actor": "worker group", "iteration": iteration,
                      "wall_s": round(life.wall_s, 3), "restarted": True, "steps_lost": lost})
            life.say(f"a sync worker failed; Ray Train restarted the workers from iteration "
                     f"{iteration}")
        self.iteration = iteration

    def _finish(self) -> None:
        if self.outcome is not None:
            raise DistbeliefError(
                f"synchronous training failed ({_cause(self.outcome)}); with fewer than "
                f"--max-restarts {self.config.cluster.max_restarts} failures Ray Train restarts "
                f"the workers, --resume continues from the last checkpoint")
        if self.diverged is not None:
            raise Diverged(f"training diverged (loss {self.diverged['loss']}) by iteration "
                           f"{self.diverged['iteration']}; lower --lr (the last checkpoint is "
                           f"kept)")
        if self.life.stop_requested and self.iteration < self.config.iterations:
            raise self.life.interrupted(self.iteration)

    def _checkpoint(self, state: dict) -> dict:
        """The workers' state as a single-process checkpoint (`engine.trainer`), with where
        Ray Train keeps this run's checkpoints."""
        epoch, batch = divmod(self.iteration, self.data.train.batches_per_epoch)
        return {**state, "data_position": {"epoch": epoch, "batch_in_epoch": batch},
                "rng": {"torch": torch.get_rng_state()}, "data_stats": self.data.stats,
                "num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
                "train_storage": None if self.scratch else self.storage}

    def eval_model(self) -> torch.nn.Module:
        return self.model

    def summary(self) -> dict:
        c = self.config
        return {"replicas": c.cluster.replicas,
                "global_batch": c.batch_size * c.cluster.replicas,
                "backend": "nccl" if self.shape and self.shape.device == "cuda" else "gloo",
                "epochs": round(self.examples / self.data.train_size, 3),
                "train_s": round(self.train_s, 3),
                "images_per_s": round(self.examples / max(self.train_s, 1e-9), 1),
                **{k: self.life.counters[k] for k in ("worker_failures", "steps_lost",
                                                      "hub_events_dropped")}}

    def close(self) -> None:
        """Stop the workers (when a failure in the driver left them running), the hub and Ray."""
        if self.thread is not None and self.thread.is_alive():
            self.hub.request_stop.remote()
            self.thread.join(timeout=60)
        if self.hub is not None:
            kill([self.hub])
            self.hub = None
        if self.session is not None:
            self.session.__exit__(None, None, None)
            self.session = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _training_state(saved: dict) -> dict:
    """What the workers load of a checkpoint."""
    return {k: saved[k] for k in ("iteration", "model", "optimizer", "schedule", "train_s")}


def _cause(error: BaseException) -> str:
    """The first line of the workers' own error when Ray Train wraps one."""
    inner = getattr(error, "worker_failures", None) or {}
    for failure in (inner.values() if isinstance(inner, dict) else inner):
        return describe(failure)
    return describe(error)
