"""The Sandblaster coordinator: L-BFGS over vectors that live on the parameter-server shards,
batch gradients from replicas that take portions one at a time (Dean et al., 2012, Sec. 4.2).

The driver process is the coordinator. It holds the L-BFGS scalars (losses, step sizes, the
history's 1/(y.s)) and sends the shards small command lists (`optim.lbfgs`); the parameters,
gradient, direction and history pairs never leave the shards, except when the driver evaluates
or checkpoints the model. Each objective evaluation is one round of `BatchGradient` (see
`distributed.sandblaster` for the protocol and why every portion counts exactly once). The run
directory, cadence, signals, failure book and summary are the shared `RunLifecycle`'s.

Run directory (on top of the single-process layout, see `engine/rundir.py`): a checkpoint is
one generation, published by checkpoints/manifest.json once all its files are written:

    checkpoints/gen-N/sandblaster.pt   the coordinator's state: iteration, batch, L-BFGS scalars
    checkpoints/gen-N/vectors-K.pt     shard K's slices of x, g, d and the history pairs
    checkpoints/gen-N/last.pt          the model at x; checkpoints/last.pt is a copy of it

`--resume` gives the shards their vectors back and restores the coordinator's scalars, so a
resumed run retraces an uninterrupted one. Only the driver writes. Between checkpoints, at the
start of every iteration, each shard sends the vectors written since the last one to the keeper
on the driver's node; a lost shard is restarted by Ray from them (on another node if its node
is gone), the others go back to them, and the iteration is repeated (`recovery`).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter

import numpy as np
import torch

from distbelief.distributed.flat import model_vector
from distbelief.distributed.runtime.calls import ShardLost
from distbelief.distributed.runtime.cluster import granted_device, replica_options, wait_started
from distbelief.distributed.runtime.session import DriverSession
from distbelief.distributed.sandblaster.actors import (RayShards, SandblasterReplicaActor,
                                                       VectorShardActor)
from distbelief.distributed.sandblaster.gradient import BatchGradient
from distbelief.distributed.sandblaster.objective import l2_objective
from distbelief.distributed.sandblaster.recovery import IterationStart
from distbelief.distributed.sandblaster.shard import snapshot_name
from distbelief.distributed.server_model import ServerModel, as_tensors
from distbelief.engine.base import BaseTrainer
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.engine.config import TrainConfig, batch_images, check_model
from distbelief.engine.failures import FailureBook
from distbelief.engine.lifecycle import Diverged
from distbelief.engine.setup import build_model, has_batchnorm
from distbelief.engine.weights import load_init
from distbelief.optim import shard_bounds
from distbelief.optim.lbfgs import LBFGS

STATE = "sandblaster"  # checkpoints/sandblaster.pt
SAME = ("model", "variant", "data", "ps_shards", "history", "dtype")  # fixed for a run's life


class TimedStore:
    """A store that adds the time spent in its shard calls (command lists, the vectors sent to
    the keeper each iteration) to `seconds`: the coordinator's overhead."""

    def __init__(self, store: RayShards):
        self.store, self.seconds, self.calls = store, 0.0, 0

    def run(self, commands):
        return self._timed(self.store.run, commands)

    def call(self, method: str, *args) -> list:
        return self._timed(self.store.call, method, *args)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def read(self, name):
        return self.store.read(name)

    def each(self, method: str, args: list[tuple]) -> list:
        """Shard k's `method(*args[k])` on every shard, untimed (`RayShards.each`)."""
        return self.store.each(method, args)


class SandblasterObjective:
    """f(x) = mean cross-entropy over the current batch + weight_decay / 2 |x|^2 (the
    `optim.lbfgs.Objective` protocol): each evaluation is one round of `gradient` on the
    replicas, finished on the shards. Counts rounds, batches and the images they held."""

    def __init__(self, images: int, weight_decay: float, full_batch: bool, state: dict):
        self.images, self.weight_decay, self.full_batch = images, weight_decay, full_batch
        self.round, self.batch = state.get("round", 0), state.get("batch", 0)
        self.examples = state.get("examples", 0)
        self.gradient: BatchGradient | None = None  # set once the actors run

    def evaluate(self, store, prepare, grad, then):
        self.round += 1
        store.run(prepare + [("round", self.round, "x")])
        loss_sum = self.gradient(self.round, self.batch)
        self.examples += self.images
        b, wd = self.images, self.weight_decay
        xx, *rest = store.run([("lincomb", grad, 1.0 / b, "acc", wd, "x"), ("dot", "x", "x")]
                              + then)
        return l2_objective(loss_sum, b, wd, xx), rest

    def advance(self) -> bool:
        if self.full_batch:
            return False
        self.batch += 1
        return True


class SandblasterTrainer(BaseTrainer):
    """Sandblaster L-BFGS: `SandblasterTrainer(config, run_dir).fit()` returns the summary dict.

    Same contract as `DownpourTrainer` (address, dashboard, request_stop, errors); stops early
    when L-BFGS converges (the reason is in the summary).
    """

    mode, state, same = "sandblaster", STATE, SAME

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        self.session = DriverSession(address, dashboard, config.cluster.connect_timeout_s)
        saved = self.open_run(config, run_dir, resume=resume, progress=progress)
        config, data = self.config, self.data
        model = build_model(config, data, self.device)
        if not saved:  # a resumed run's parameters come from its checkpoint
            load_init(model, config)
        if saved:  # the parameters of the last checkpoint, in case the vectors are unusable
            model.load_state_dict(load_checkpoint(self.life.run.state_file("last"))["model"])
        vector, n_params = model_vector(model)
        check_model(config, values=n_params, batchnorm=has_batchnorm(model))
        self.initial = vector.to(getattr(torch, config.sandblaster.dtype))
        self.bounds = shard_bounds(n_params, config.cluster.ps_shards)
        self.server = ServerModel(config, data, self.device, model=model)
        images = batch_images(config, data.train_size)
        self.objective = SandblasterObjective(images, config.weight_decay,
                                              images == data.train_size, saved or {})
        self.saved = saved
        self.iteration = saved["iteration"] if saved else 0
        self.replica_portions = Counter({int(k): v for k, v in (
            saved["replica_portions"] if saved else {}).items()})
        self.converged: str | None = None

    # --- what the lifecycle calls ------------------------------------------------------

    @property
    def position(self) -> int:
        return self.iteration

    @property
    def examples(self) -> int:
        return self.objective.examples

    @property
    def round(self) -> int:
        return self.objective.round

    def start(self) -> None:
        """Ray, the vector shards, the replicas (once all are placed and answer), and the batch
        gradient over them."""
        c, session = self.config, self.session
        session.start()
        self.server.move_to(granted_device())
        self.data, self.device = self.server.data, self.server.device
        names = [session.name(snapshot_name(k)) for k in range(c.cluster.ps_shards)]
        # Restarted by Ray after a failure (not retried: the coordinator repeats the iteration).
        session.shards = [VectorShardActor.options(
            name=name, scheduling_strategy=strategy, max_restarts=c.cluster.max_restarts,
            max_task_retries=0).remote(k, lo, hi, session.keeper_name)
            for k, ((lo, hi), name, strategy) in enumerate(
                zip(self.bounds, names, session.place_shards(c.cluster.ps_shards)))]
        self.store = TimedStore(RayShards(session.shards, self.bounds))
        self.start_of = IterationStart(self.store, self.life)
        options, self.shape = replica_options(c)
        self.session.replicas = [SandblasterReplicaActor.options(**options).remote(
            r, c, names, self.bounds, self.data.stats, self.shape.threads, self.shape.device,
            c.sandblaster.straggler_delay if r == 0 else 0.0) for r in range(c.cluster.replicas)]
        book = FailureBook(self.life, c.cluster.replicas, c.cluster.max_restarts)
        self.gradient = BatchGradient(c, self.session.replicas, self.store, book,
                                      self.life.counters, lambda: self.iteration)
        self.objective.gradient = self.gradient
        self.placed = wait_started(self.session.replicas, self.shape)

    def close(self) -> None:
        self.session.close()

    def eval_model(self) -> torch.nn.Module:
        return self.server.load(self.store.read("x"))

    def progress_text(self) -> str:
        return f"loss {self.life.last_train.get('loss', float('nan')):.6f}"

    # --- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        c, life = self.config, self.life
        life.log({"kind": "cluster", "iteration": self.iteration,
                  "replicas": self.placed,
                  "shards": [{k: st[k] for k in ("shard", "node", "elements")}
                             for st in self.store.call("stats")]})
        self.optimizer = LBFGS(self.store, self.objective, history=c.sandblaster.history,
                               lr=c.lr, line_search=c.sandblaster.line_search)
        restored = self._restore_vectors()
        if not restored:
            self.store.run([("set", "x", self.initial)])
        self.initial = None  # from here on the parameters live on the shards only
        cadence = life.cadences(c, self.iteration)
        life.clock.start()
        try:
            self._start_optimizer(restored)
            while self.iteration < c.iterations and not self.converged \
                    and not life.stop_requested:
                self._iterate()
                if cadence.eval.due(self.iteration):
                    life.evaluate(self)
                    cadence.eval.done(self.iteration)
                if cadence.checkpoint.due(self.iteration):
                    self.save()
                    cadence.checkpoint.done(self.iteration)
        finally:
            life.clock.stop()
        self.save()
        if life.stop_requested and self.iteration < c.iterations and not self.converged:
            raise life.interrupted(self.iteration)

    def _start_optimizer(self, restored: bool) -> None:
        if restored:
            self.optimizer.load_state_dict(self.saved["lbfgs"])
            self.converged = self.optimizer.converged
            return
        record = self.optimizer.start()
        if self.iteration == 0:
            self._log_iteration(record, 0.0, 0.0, Counter())

    def _iterate(self) -> None:
        """One L-BFGS iteration, logged with where its time went; repeated if a shard is lost
        on the way (`recovery`)."""
        counts = Counter(self.life.counters)
        began, store_before = time.perf_counter(), self.store.seconds
        self.start_of.mark(self.iteration, self.optimizer, self.objective)
        while True:
            self.gradient.won_now = Counter()
            try:
                record = self.optimizer.step()
                break
            except ShardLost as lost:
                self.start_of.rebuild(lost, self.optimizer, self.objective)
        self.iteration += 1
        self.converged = record["converged"]
        seconds = time.perf_counter() - began
        self._log_iteration(record, seconds, self.store.seconds - store_before, counts)
        if not math.isfinite(self.optimizer.loss):
            raise Diverged(f"the objective is not finite at iteration {self.iteration}; lower "
                           f"--lr (the last checkpoint is kept)")

    def _restore_vectors(self) -> bool:
        """On --resume, give each shard its vectors of the checkpoint; True when all of them
        are from the iteration of the coordinator's state (then the L-BFGS state is restored
        too). Otherwise (a snapshot missing, or a run written before checkpoint generations
        that crashed between two writes) the run goes on from the checkpoint's parameters."""
        if self.saved is None or "lbfgs" not in self.saved:
            return False
        paths = [self.life.run.state_file(snapshot_name(k))
                 for k in range(self.config.cluster.ps_shards)]
        iterations = None
        if all(p.is_file() for p in paths):
            iterations = self.store.each("restore", [(load_checkpoint(p),) for p in paths])
        if iterations != [self.saved["iteration"]] * len(paths):
            self.life.say("the shards' vector snapshots do not match the last checkpoint; "
                          "continuing from its parameters with an empty L-BFGS history")
            return False
        return True

    # --- records and checkpoints ------------------------------------------------------------

    def _log_iteration(self, record: dict, seconds: float, store_s: float,
                       before: Counter) -> None:
        c, counters = self.config, self.life.counters
        self.life.log_train({
            "kind": "train", "iteration": self.iteration, "loss": record["loss"],
            "grad_norm": record.get("grad_norm"), "step": record.get("step"),
            "evals": record.get("evals"), "batch": self.objective.batch,
            "examples": self.examples, "wall_s": round(self.life.wall_s, 3),
            "seconds": round(seconds, 4), "coordinator_s": round(store_s, 4),
            "gradient_s": round(seconds - store_s, 4),
            "portions_per_replica": [self.gradient.won_now[r]
                                     for r in range(c.cluster.replicas)],
            "backup_tasks": counters["backup_tasks"] - before["backup_tasks"],
            "backup_wasted": counters["backup_wasted"] - before["backup_wasted"],
            "converged": record.get("converged")})
        if self.iteration % c.log_every == 0 or record.get("converged"):
            self.life.say(f"iteration {self.iteration}/{c.iterations}: loss {record['loss']:.6f}"
                          + (f", step {record['step']:.3g}" if record.get("step") else ""))

    def save(self) -> None:
        """One checkpoint generation: every shard's vectors, the model at their x (last.pt)
        and the coordinator's state; parameters that are not finite never replace a good
        checkpoint."""
        if self.life.run is None:
            return
        states = self.store.call("state", self.iteration)
        vector = torch.from_numpy(np.concatenate([st["slots"]["x"] for st in states]))
        ServerModel.check_finite(vector, self.iteration)
        files = {snapshot_name(k): as_tensors(st) for k, st in enumerate(states)}
        files["last"] = self.server.checkpoint(vector.float(), self.iteration, self.life.wall_s,
                                               "sandblaster")
        o = self.objective
        self.life.save_generation(self.config, {
            "iteration": self.iteration, "batch": o.batch, "examples": o.examples,
            "round": o.round, "replica_portions": dict(self.replica_portions + self.gradient.won),
            "data_stats": self.data.stats, "lbfgs": self.optimizer.state_dict()}, files,
            self.iteration)

    def summary(self) -> dict:
        c, counters, o = self.config, self.life.counters, self.objective
        won = self.replica_portions + self.gradient.won
        return {
            "replicas": c.cluster.replicas, "ps_shards": c.cluster.ps_shards,
            "portions": c.sandblaster.portions, "history": c.sandblaster.history,
            "line_search": c.sandblaster.line_search, "batch_images": o.images,
            "backup_tasks_enabled": c.sandblaster.backup_tasks, "converged": self.converged,
            "grad_norm": self.life.last_train.get("grad_norm"), "train_error": None,
            "evaluations": self.optimizer.evals,
            "coordinator_s": round(self.store.seconds, 3), "coordinator_calls": self.store.calls,
            "portions_per_replica": [won[r] for r in range(c.cluster.replicas)],
            **{k: counters[k] for k in ("portions_computed", "portions_recomputed",
                                        "backup_tasks", "backup_wasted", "replica_failures",
                                        "replica_restarts", "shard_failures",
                                        "iterations_repeated")}}
