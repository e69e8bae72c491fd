"""The Sandblaster coordinator: L-BFGS over vectors that live on the parameter-server shards,
batch gradients from replicas that take portions one at a time (Dean et al., 2012, Sec. 4.2).

The driver process is the coordinator. It holds the L-BFGS scalars (losses, step sizes, the
history's 1/(y.s)) and sends the shards small command lists (`optim.lbfgs`); the parameters,
gradient, direction and history pairs never leave the shards, except when the driver evaluates
or checkpoints the model. Each objective evaluation is one round of `_batch_gradient` (see
`distributed.sandblaster` for the protocol and why every portion counts exactly once).

Run directory (on top of the single-process layout, see `engine/rundir.py`):

    checkpoints/last.pt          the model at the last checkpoint, loadable by `distbelief eval`
    checkpoints/sandblaster.pt   the coordinator's state: iteration, batch, L-BFGS scalars, clock
    checkpoints/vectors-K.pt     shard K's slices of x, g, d and the history pairs

`--resume` reloads the shards' vectors and the coordinator's scalars, so a resumed run retraces
an uninterrupted one. Shards write their own snapshots (the coordinator never holds the
vectors), so on a multi-node cluster the run directory must be on storage every node sees. If
the vector snapshots are missing or from another iteration than sandblaster.pt (a crash between
the writes), the run continues from last.pt's parameters with an empty history instead.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import Counter

import torch

from distbelief.data import build_data
from distbelief.distributed.job import RayJob
from distbelief.distributed.sandblaster import PortionQueue, has_batchnorm, l2_objective
from distbelief.distributed.shard import model_vector
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.trainer import Diverged, TrainingInterrupted, build_model, resolve_device
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError
from distbelief.optim import shard_bounds
from distbelief.optim.lbfgs import LBFGS

POLL_S = 0.5
PORTIONS_PER_REPLICA = 16  # default --portions: many more portions than replicas


class TimedStore:
    """A store that adds the time spent in its commands to `seconds` (coordinator overhead)."""

    def __init__(self, store):
        self.store, self.seconds, self.calls = store, 0.0, 0

    def run(self, commands):
        start = time.perf_counter()
        try:
            return self.store.run(commands)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def read(self, name):
        return self.store.read(name)


class SandblasterObjective:
    """f(x) = mean cross-entropy over the current batch + weight_decay / 2 |x|^2, evaluated by
    the replicas (`trainer._batch_gradient`) and finished on the shards."""

    def __init__(self, trainer: "SandblasterTrainer"):
        self.trainer = trainer

    def evaluate(self, store, prepare, grad, then):
        t = self.trainer
        t.round += 1
        store.run(prepare + [("round", t.round, "x")])
        loss_sum = t._batch_gradient(t.round, t.batch)
        b, wd = t.batch_images, t.config.weight_decay
        xx, *rest = store.run([("lincomb", grad, 1.0 / b, "acc", wd, "x"), ("dot", "x", "x")]
                              + then)
        return l2_objective(loss_sum, b, wd, xx), rest

    def advance(self) -> bool:
        t = self.trainer
        if t.full_batch:
            return False
        t.batch += 1
        return True


class SandblasterTrainer(RayJob):
    """Sandblaster L-BFGS: `SandblasterTrainer(config, run_dir).fit()` returns the summary dict.

    Same contract as `DownpourTrainer` (address, dashboard, request_stop, errors); stops early
    when L-BFGS converges (the reason is in the summary).
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        if config.mode != "sandblaster":
            config = config.replace(mode="sandblaster")
        state = self._open_run(config, run_dir, resume, "sandblaster_state",
                               ("model", "data", "ps_shards", "history", "dtype"),
                               address, dashboard, progress)
        checkpoint = load_checkpoint(self.run.checkpoint) if state else None
        if config.data == "imagenet":
            raise ConfigError("--mode sandblaster needs an in-memory dataset (digits, cifar10 or "
                              "synthetic): portions index the training split")

        self.device = resolve_device("auto" if config.device != "cpu" else "cpu")
        self.data = build_data(config, self.device,
                               stats=state["data_stats"] if state else None)
        n = self.data.train_size
        self.full_batch = config.batch_size == 0 or config.batch_size >= n
        self.batch_images = n if self.full_batch else config.batch_size
        if config.epochs is not None:
            config = config.replace(iterations=max(1, math.ceil(
                config.epochs * n / self.batch_images)), epochs=None)
        if config.portions is None:
            config = config.replace(portions=min(self.batch_images,
                                                 PORTIONS_PER_REPLICA * config.replicas))
        if config.portions > self.batch_images:
            raise ConfigError(f"--portions {config.portions} exceeds the {self.batch_images} "
                              f"images of a batch")
        self.config = config
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data, self.device)
        if has_batchnorm(self.model):
            raise ConfigError(f"--mode sandblaster needs a model without BatchNorm (softmax or "
                              f"mlp): batch statistics would make the batch objective depend on "
                              f"how it is cut into portions; {config.model} has BatchNorm")
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
        self.initial, n_params = model_vector(self.model)
        self.initial = self.initial.to(getattr(torch, config.dtype))
        if config.ps_shards > n_params:
            raise ConfigError(f"--ps-shards {config.ps_shards} exceeds the model's {n_params} "
                              f"parameters")
        self.bounds = shard_bounds(n_params, config.ps_shards)

        self.state = state
        self.iteration = state["iteration"] if state else 0
        self.batch = state["batch"] if state else 0
        self.wall_s = state["wall_s"] if state else 0.0
        self.examples = state["examples"] if state else 0
        self.counters = Counter(state["counters"] if state else {})
        self.replica_portions = Counter({int(k): v for k, v in (
            state["replica_portions"] if state else {}).items()})
        self.round = 0
        self.converged: str | None = None
        self.last_train: dict = {}
        self._last_eval: dict | None = None
        self._stop = False
        if state:
            self.run.truncate_metrics(self.iteration)
            self.run.log({"kind": "resume", "iteration": self.iteration})
            self.run.update_config(config)
        elif resume and self.run.config_file.is_file():
            self.run.truncate_metrics(0)
            self.run.log({"kind": "resume", "iteration": 0})
            self.run.update_config(config)
        elif self.run is not None:
            self.run.create(config, str(self.device))
        self.shards: list = []
        self.replicas: list = []

    # --- actors ------------------------------------------------------------------------

    def _start_actors(self) -> None:
        import ray

        from distbelief.distributed.actors import (RayShards, SandblasterReplicaActor,
                                                   VectorShardActor, pinned_round_robin)

        c = self.config
        run_id = uuid.uuid4().hex[:12]
        names = [f"distbelief-{run_id}-vectors-{k}" for k in range(c.ps_shards)]
        self.shards = [VectorShardActor.options(name=name, scheduling_strategy=strategy)
                       .remote(k, lo, hi)
                       for k, ((lo, hi), name, strategy) in enumerate(
                           zip(self.bounds, names, pinned_round_robin(c.ps_shards)))]
        self.store = TimedStore(RayShards(self.shards, self.bounds))
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        if c.device == "cuda" and not gpus:
            raise ConfigError("--device cuda but the Ray cluster has no GPUs")
        use_gpu = c.device == "cuda" or (c.device == "auto" and gpus > 0)
        threads = c.replica_cpus or max(1, int(cpus // c.replicas))
        self.replicas = [
            SandblasterReplicaActor.options(
                num_cpus=min(threads, cpus / c.replicas),
                num_gpus=min(1.0, gpus / c.replicas) if use_gpu else 0,
                max_restarts=c.max_restarts, max_task_retries=0, scheduling_strategy="SPREAD",
            ).remote(r, c, names, self.bounds, self.data.stats, threads,
                     "cuda" if use_gpu else "cpu", c.straggler_delay if r == 0 else 0.0)
            for r in range(c.replicas)]
        self.live = set(range(c.replicas))
        self.lives = Counter()  # replica -> failures seen: a call made before one is stale
        self.inflight: dict = {}  # ObjectRef of a compute call -> (replica, round, portion)
        self.unresolved: dict = {}  # replica -> verdict on its last result, sent with its next call
        self.sent: dict = {}  # replica -> the last verdict sent to it
        self.recovering: dict = {}  # ObjectRef of a ping -> replica restarting after a failure

    # --- one batch gradient ------------------------------------------------------------

    def _batch_gradient(self, round_: int, batch: int) -> float:
        """Have the replicas compute the batch's gradient sum into the shards' "acc"; returns
        the summed loss. Every portion counts exactly once (see distributed.sandblaster)."""
        import ray

        c = self.config
        queue = PortionQueue(c.portions, c.backup_tasks)
        losses: dict[int, float] = {}

        def offer() -> None:
            busy = {r for r, *_ in self.inflight.values()} | set(self.recovering.values())
            for r in sorted(self.live - busy):
                job = queue.take(r)
                if job is not None:
                    p, solo = job
                    ref = self.replicas[r].compute.remote(round_, batch, p, solo,
                                                          self._verdict(r))
                    self.inflight[ref] = (r, round_, p, self.lives[r])

        offer()
        while True:
            if queue.done:
                missing = self._collect(round_)
                if not missing:
                    break
                self.counters["portions_recomputed"] += len(missing)
                queue.missing(missing)
                for p in missing:
                    losses.pop(p, None)
                offer()
                continue
            if not self.inflight and not self.recovering:
                raise DistbeliefError("no replica is left to compute the batch")
            ready, _ = ray.wait(list(self.inflight) + list(self.recovering), num_returns=1,
                                timeout=POLL_S)
            for ref in ready:
                if ref in self.recovering:
                    self._recovered(ref)
                    continue
                r, rnd, p, life = self.inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted out by _replica_failed
                    self._replica_failed(r, e, life)
                    if rnd == round_:
                        queue.failed(r)
                    continue
                self.counters["portions_computed"] += 1
                if rnd != round_:  # a copy from an earlier round, still running when it ended
                    win = False
                    self.counters["backup_wasted"] += 1
                else:
                    wasted_before = queue.wasted
                    win = queue.finished(r, p)
                    self.counters["backup_wasted"] += queue.wasted - wasted_before
                    if win:
                        losses[p] = result["loss_sum"]
                        self.replica_portions[r] += 1
                        self.iteration_portions[r] += 1
                self.unresolved[r] = (rnd, p, win)
                if not math.isfinite(result["loss_sum"]):
                    raise Diverged(f"the loss is not finite (replica {r}, iteration "
                                   f"{self.iteration}); lower --lr or use --line-search "
                                   f"strong_wolfe (the last checkpoint is kept)")
            offer()
        self.counters["backup_tasks"] += queue.backups
        self.examples += self.batch_images
        return math.fsum(losses.values())

    def _recovered(self, ref) -> None:
        """A restarting replica's ping came back: it takes work again, is still restarting
        (ping again), or died once more (a new failure)."""
        import ray
        from ray.exceptions import ActorUnavailableError

        r = self.recovering.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            time.sleep(0.05)
            self.recovering[self.replicas[r].info.remote()] = r
        except Exception as e:  # noqa: BLE001 - sorted out by _replica_failed
            self._replica_failed(r, e, self.lives[r])

    def _verdict(self, r: int):
        """The verdict on replica r's last result, for its next call. Sent again until a newer
        one exists: a flush can overtake the compute call that carried it (they run on
        different threads of the replica), and applying a verdict twice does nothing."""
        if r in self.unresolved:
            self.sent[r] = self.unresolved.pop(r)
        return self.sent.get(r)

    def _collect(self, round_: int) -> set[int]:
        """Every live replica pushes what it holds of `round_`; returns the portions some shard
        lacks (their winners died before pushing them)."""
        import ray

        from distbelief.distributed.actors import get_from_shards

        refs = {self.replicas[r].flush.remote(round_, self._verdict(r)): (r, self.lives[r])
                for r in sorted(self.live - set(self.recovering.values()))}
        for ref, (r, life) in refs.items():
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001
                self._replica_failed(r, e, life)
        if self.store.run([("held",)])[0] == self.config.portions:
            return set()
        everything = set(range(self.config.portions))
        return set().union(*(everything - set(st["held"]) for st in
                             get_from_shards([s.stats.remote() for s in self.shards])))

    def _replica_failed(self, r: int, error: Exception, life: int) -> None:
        """A replica's call failed: a shard is gone (the run cannot go on), or the replica died
        (Ray restarts it up to --max-restarts times; its portions are computed again). `life`
        is the replica's failure count when the call was made: calls made before a failure
        that is counted already fail with it and are not counted again."""
        from ray.exceptions import RayActorError, RayTaskError

        c = self.config
        if isinstance(error, RayTaskError):
            if isinstance(error.cause, RayActorError):
                raise DistbeliefError("a parameter-server shard is gone; --resume continues "
                                      "from the last checkpoint") from None
            raise error
        if not isinstance(error, RayActorError):
            raise error
        if life < self.lives[r] or r not in self.live or r in self.recovering.values():
            return  # a call made before the failure that is being handled
        self.lives[r] += 1
        for ref in [ref for ref, (who, *_) in self.inflight.items() if who == r]:
            del self.inflight[ref]
        self.unresolved.pop(r, None)
        self.sent.pop(r, None)
        restart = self.counters[f"replica_{r}_restarts"] < c.max_restarts
        self.counters["replica_failures"] += 1
        if restart:
            self.counters[f"replica_{r}_restarts"] += 1
            self.counters["replica_restarts"] += 1
            # No work until it answers: calls to a restarting actor fail at once.
            self.recovering[self.replicas[r].info.remote()] = r
        else:
            self.live.discard(r)
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        self._log({"kind": "failure", "actor": f"replica {r}", "iteration": self.iteration,
                   "wall_s": round(self.wall_s, 3), "restarted": restart, "error": reason})
        self._say(f"replica {r} failed ({type(error).__name__}); "
                  + ("restarting it" if restart else "giving up on it"))
        if not self.live:
            raise DistbeliefError(f"every replica failed more than --max-restarts "
                                  f"{c.max_restarts} times; last error: {reason}")

    # --- the loop ------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self.iteration

    @property
    def examples_seen(self) -> int:
        return self.examples

    def _progress_text(self) -> str:
        return f"loss {self.last_train.get('loss', float('nan')):.6f}"

    def _train(self) -> None:
        from distbelief.distributed.actors import get_from_shards

        c = self.config
        clock = time.perf_counter
        self._wait_for_replicas(get_from_shards([s.stats.remote() for s in self.shards]))
        self.optimizer = LBFGS(self.store, SandblasterObjective(self), history=c.history,
                               lr=c.lr, line_search=c.line_search)
        restored = self._restore_vectors()
        if not restored:
            self.store.run([("set", "x", self.initial)])
        self.initial = None  # from here on the parameters live on the shards only
        loop_start, wall_before = clock(), self.wall_s
        next_eval = (self.iteration // c.eval_every + 1) * c.eval_every \
            if c.eval_every else math.inf
        next_ckpt = (self.iteration // c.checkpoint_every + 1) * c.checkpoint_every \
            if c.checkpoint_every else math.inf
        try:
            self.iteration_portions = Counter()
            if restored:
                self.optimizer.load_state_dict(self.state["lbfgs"])
                self.round = self.state["round"]
                self.converged = self.optimizer.converged
            else:
                start = self.optimizer.start()
                self.wall_s = wall_before + clock() - loop_start
                if self.iteration == 0:
                    self._log_iteration(start, 0.0, 0.0, 0.0)
            while self.iteration < c.iterations and not self.converged and not self._stop:
                self.iteration_portions = Counter()
                counts = Counter(self.counters)
                began, store_before = clock(), self.store.seconds
                record = self.optimizer.step()
                self.iteration += 1
                self.converged = record["converged"]
                self.wall_s = wall_before + clock() - loop_start
                seconds = clock() - began
                self._log_iteration(record, seconds, self.store.seconds - store_before,
                                    seconds - (self.store.seconds - store_before), counts)
                if not math.isfinite(self.optimizer.loss):
                    raise Diverged(f"the objective is not finite at iteration {self.iteration}; "
                                   f"lower --lr (the last checkpoint is kept)")
                if self.iteration >= next_eval:
                    self._evaluate_all()
                    next_eval = (self.iteration // c.eval_every + 1) * c.eval_every
                if self.iteration >= next_ckpt:
                    self.save()
                    next_ckpt = (self.iteration // c.checkpoint_every + 1) * c.checkpoint_every
        finally:
            self.wall_s = wall_before + clock() - loop_start
        self.save()
        if self._stop and self.iteration < c.iterations and not self.converged:
            raise TrainingInterrupted(f"stopped at iteration {self.iteration}; checkpoint "
                                      f"saved, continue with --resume")

    def _restore_vectors(self) -> bool:
        """On --resume, have each shard reload its vectors; True when all of them are from the
        iteration of the coordinator's state (then the L-BFGS state is restored too)."""
        from ray.exceptions import RayTaskError

        from distbelief.distributed.actors import get_from_shards

        if self.state is None or "lbfgs" not in self.state:
            return False
        paths = [self.run.vector_snapshot(k) for k in range(self.config.ps_shards)]
        if not all(p.is_file() for p in paths):
            iterations = None
        else:
            try:
                iterations = get_from_shards([s.restore.remote(str(p.resolve()))
                                              for s, p in zip(self.shards, paths)])
            except RayTaskError as e:
                raise e.cause if isinstance(e.cause, CheckpointError) else e from None
        if iterations != [self.state["iteration"]] * len(paths):
            self._say("the shards' vector snapshots do not match the last checkpoint; "
                      "continuing from its parameters with an empty L-BFGS history")
            return False
        return True

    # --- records -------------------------------------------------------------------------

    def _log_iteration(self, record: dict, seconds: float, store_s: float, gradient_s: float,
                       before: Counter | None = None) -> None:
        before = before or Counter()
        c = self.config
        self.last_train = {
            "kind": "train", "iteration": self.iteration, "loss": record["loss"],
            "grad_norm": record.get("grad_norm"), "step": record.get("step"),
            "evals": record.get("evals"), "batch": self.batch, "examples": self.examples,
            "wall_s": round(self.wall_s, 3), "seconds": round(seconds, 4),
            "coordinator_s": round(store_s, 4), "gradient_s": round(gradient_s, 4),
            "portions_per_replica": [self.iteration_portions[r] for r in range(c.replicas)],
            "backup_tasks": self.counters["backup_tasks"] - before["backup_tasks"],
            "backup_wasted": self.counters["backup_wasted"] - before["backup_wasted"],
            "converged": record.get("converged")}
        self._log(self.last_train)
        if self.progress and (self.iteration % c.log_every == 0 or record.get("converged")):
            self._say(f"iteration {self.iteration}/{c.iterations}: loss {record['loss']:.6f}"
                      + (f", step {record['step']:.3g}" if record.get("step") else ""))

    def server_vector(self) -> torch.Tensor:
        """The parameters "x", gathered from the shards."""
        return self.store.read("x")

    def save(self) -> None:
        """Have the shards snapshot their vectors, then write last.pt (the model at x) and the
        coordinator's state; parameters that are not finite never replace a good checkpoint."""
        if self.run is None:
            return
        from distbelief.distributed.actors import get_from_shards

        vector = self._finite_server_vector()
        # Vectors first: a crash before sandblaster.pt is written leaves snapshots newer than
        # it, which --resume detects (it then continues from last.pt's parameters).
        get_from_shards([s.snapshot.remote(str(self.run.vector_snapshot(k).resolve()),
                                           self.iteration)
                         for k, s in enumerate(self.shards)])
        self._write_model(vector, "sandblaster")
        c = self.config
        save_checkpoint(self.run.sandblaster_state, {
            "config": c.to_dict(), "iteration": self.iteration, "batch": self.batch,
            "wall_s": self.wall_s, "examples": self.examples, "counters": dict(self.counters),
            "replica_portions": dict(self.replica_portions), "data_stats": self.data.stats,
            "last_train": self.last_train, "lbfgs": self.optimizer.state_dict(),
            "round": self.round})

    def _summarize(self, results: dict) -> dict:
        c, test = self.config, results["test"]
        summary = {
            "recipe": c.recipe, "model": c.model, "data": c.data, "device": str(self.device),
            "mode": "sandblaster", "replicas": c.replicas, "ps_shards": c.ps_shards,
            "portions": c.portions, "history": c.history, "line_search": c.line_search,
            "batch_images": self.batch_images, "backup_tasks_enabled": c.backup_tasks,
            "iterations": self.iteration, "examples": self.examples,
            "epochs": round(self.examples / self.data.train_size, 3),
            "converged": self.converged,
            "test_error": test["error"], "test_accuracy": 1 - test["error"],
            "test_top5_error": test["top5_error"], "test_loss": test["loss"],
            "train_loss": self.last_train.get("loss"),
            "grad_norm": self.last_train.get("grad_norm"),
            "train_error": None,
            "wall_s": round(self.wall_s, 3),
            "images_per_s": round(self.examples / max(self.wall_s, 1e-9), 1),
            "evaluations": self.optimizer.evals,
            "coordinator_s": round(self.store.seconds, 3),
            "coordinator_calls": self.store.calls,
            "portions_per_replica": [self.replica_portions[r] for r in range(c.replicas)],
            "portions_computed": self.counters["portions_computed"],
            "portions_recomputed": self.counters["portions_recomputed"],
            "backup_tasks": self.counters["backup_tasks"],
            "backup_wasted": self.counters["backup_wasted"],
            "replica_failures": self.counters["replica_failures"],
            "replica_restarts": self.counters["replica_restarts"],
        }
        if "val" in results:
            summary["val_error"] = results["val"]["error"]
        if self.run is not None:
            self.run.write_summary(summary)
        return summary
