"""The Downpour driver: starts the shards and replicas on Ray, hands out work, evaluates the
server's parameters, records metrics, checkpoints and recovers from failures.

The driver never holds the training state: parameters live on the shards and only pass through
the driver when it evaluates or checkpoints. It hands each replica chunks of `CHUNK_STEPS` of
its own steps (the decisions are `downpour.WorkQueue`'s); a replica that finishes one gets the
next, until the steps of all replicas together reach `iterations`. So fast replicas do more, a
dead replica only stops its own work, and the driver can evaluate, log and checkpoint while
replicas keep training (each replica has up to two chunks queued, so it never idles while the
driver is busy).

Run directory (on top of the single-process layout, see `engine/rundir.py`):

    checkpoints/last.pt             the server's model, loadable by `distbelief eval`
    checkpoints/downpour.pt         the driver's state: replica positions, counters, clock
    checkpoints/shard-K.pt          shard K's snapshot (its slice, optimizer state, version)

Shards write their own snapshots (every `snapshot_every_s`), so on a multi-node cluster the run
directory must be on storage that every node sees, as with any Ray checkpoint directory.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import torch

from distbelief.data import build_data
from distbelief.distributed.downpour import WorkQueue, initial_vector
from distbelief.distributed.job import RayJob
from distbelief.engine.checkpoint import save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.trainer import Diverged, TrainingInterrupted, build_model, resolve_device
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError
from distbelief.optim import shard_bounds

CHUNK_STEPS = 10  # replica steps per work request (WorkQueue)
QUEUED_CHUNKS = 2  # chunks queued per replica, so it keeps training while the driver is busy
POLL_S = 0.5
TIME_PARTS = ("compute_s", "fetch_wait_s", "push_wait_s")  # longest wait for a result before the driver checks its clocks


class DownpourTrainer(RayJob):
    """Downpour SGD: `DownpourTrainer(config, run_dir).fit()` returns the summary dict.

    `address` joins a Ray cluster; without it a local Ray is started and shut down at the end
    (unless Ray is already initialized in this process, as in tests). `request_stop()` (from a
    signal handler) makes it stop handing out work, let the replicas finish their chunks,
    checkpoint, and raise `TrainingInterrupted`.

    Raises:
        ConfigError, DataError, CheckpointError: before anything in `run_dir` is written.
        Diverged: a replica's loss became NaN or infinite.
        DistbeliefError: every replica failed more than `max_restarts` times, or a shard did.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        if config.mode != "downpour":
            config = config.replace(mode="downpour")
        state = self._open_run(config, run_dir, resume, "downpour_state",
                               ("model", "replicas", "ps_shards", "optimizer", "data"),
                               address, dashboard, progress)
        if state:
            missing = [k for k in range(config.ps_shards)
                       if not self.run.shard_snapshot(k).is_file()]
            if missing:
                raise CheckpointError(f"{self.run.path} lacks the snapshot of shard(s) "
                                      f"{', '.join(map(str, missing))}")

        # The driver only evaluates: on this machine's GPU if it has one, else its CPU (the
        # replicas' device is decided by what the Ray cluster offers).
        self.device = resolve_device("auto" if config.device != "cpu" else "cpu")
        torch.manual_seed(config.seed)
        self.data = build_data(config, self.device, stats=state["data_stats"] if state else None)
        config = config.resolve_epochs(self.data.train_size)
        if config.replicas > self.data.train_size // config.batch_size:
            raise ConfigError(f"{config.replicas} replicas with batches of {config.batch_size} "
                              f"need more than the {self.data.train_size} training images")
        self.config = config
        self.initial, self.n_params = initial_vector(config, self.data)
        if config.ps_shards > self.initial.numel():
            raise ConfigError(f"--ps-shards {config.ps_shards} exceeds the model's "
                              f"{self.initial.numel()} values")
        self.bounds = shard_bounds(self.initial.numel(), config.ps_shards)
        self.model = build_model(config, self.data, self.device)  # for evaluation

        n = config.replicas
        self.positions = [0] * n  # each replica's completed steps = its data position
        self.steps = 0  # completed steps of all replicas together
        self.wall_s = 0.0
        self.counters = Counter()  # failures, restarts, lost steps and updates
        self.replica_images = [0] * n
        self.replica_seconds = [0.0] * n
        self.time_split = Counter()  # replicas' seconds in compute, fetch and push waits
        self.last_train: dict = {}
        self._last_eval: dict | None = None
        self._stop = False
        self.resumed_shards = False
        if state:
            self.positions, self.steps = list(state["positions"]), state["steps"]
            self.wall_s, self.last_train = state["wall_s"], state["last_train"]
            self.counters.update(state["counters"])
            self.replica_images = list(state["replica_images"])
            self.replica_seconds = list(state["replica_seconds"])
            self.time_split.update(state["time_split"])
            self.resumed_shards = True
            self.run.truncate_metrics(self.steps)
            self.run.log({"kind": "resume", "iteration": self.steps})
        elif resume and self.run.config_file.is_file():
            self.run.truncate_metrics(0)  # stopped before its first checkpoint: start over
            self.run.log({"kind": "resume", "iteration": 0})
        if resume:
            self.run.update_config(config)
        elif self.run is not None:
            self.run.create(config, str(self.device))
        self.shards: list = []
        self.replicas: list = []

    # --- actors ------------------------------------------------------------------------

    def _start_actors(self) -> None:
        import ray

        from distbelief.distributed.actors import ReplicaActor, ShardActor, pinned_round_robin

        c = self.config
        self.snapshot_paths = [str(self.snapshot_dir / f"shard-{k}.pt")
                               for k in range(c.ps_shards)]
        spread = {"scheduling_strategy": "SPREAD"}
        # Replicas find the shards by name: actor handles among constructor arguments would
        # pin them in the object store, which Ray warns makes restarts fragile.
        run_id = uuid.uuid4().hex[:12]
        self.shard_names = [f"distbelief-{run_id}-shard-{k}" for k in range(c.ps_shards)]
        # Shards are pinned round-robin over the nodes. A shard restarts on its node; if the node
        # itself is lost the run stops and --resume continues from the snapshots.
        self.shards = [
            ShardActor.options(
                name=name, max_restarts=c.max_restarts, max_task_retries=-1,
                scheduling_strategy=strategy,
            ).remote(k, lo, hi, self.n_params, c, self.snapshot_paths[k])
            for k, ((lo, hi), name, strategy) in enumerate(
                zip(self.bounds, self.shard_names, pinned_round_robin(c.ps_shards)))]
        # Replicas start (a few seconds each) while the shards load; work waits for both.
        self.shards_started = [
            s.start.remote(None if self.resumed_shards else self.initial[lo:hi].numpy())
            for s, (lo, hi) in zip(self.shards, self.bounds)]
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        threads = c.replica_cpus or max(1, int(cpus // c.replicas))
        use_gpu = c.device == "cuda" or (c.device == "auto" and gpus > 0)
        if c.device == "cuda" and not gpus:
            raise ConfigError("--device cuda but the Ray cluster has no GPUs")
        gpu_share = min(1.0, gpus / c.replicas) if use_gpu else 0
        self.replicas = [
            # More replicas than CPUs share them (fractional reservations), never wait forever.
            ReplicaActor.options(num_cpus=min(threads, cpus / c.replicas), num_gpus=gpu_share,
                                 max_restarts=c.max_restarts, max_task_retries=0,
                                 **spread).remote(
                r, c, self.shard_names, self.bounds, self.data.stats, threads,
                "cuda" if use_gpu else "cpu")
            for r in range(c.replicas)]
        self.shard_info = {}  # shard -> (incarnation, last version seen)

    def server_vector(self) -> torch.Tensor:
        """The server's current [parameters; buffers], gathered from all shards at once."""
        import ray

        from distbelief.distributed.actors import _join_pulls

        return _join_pulls(ray.get([s.pull.remote() for s in self.shards]))[0]

    def _poll_shards(self) -> list[dict]:
        """Shard statistics; counts restarts and the updates they lost (the versions seen before
        a failure beyond the restored snapshot: a lower bound, as updates after the last poll
        are unseen)."""
        import ray

        statuses = ray.get([s.status.remote() for s in self.shards])
        for st in statuses:
            k = st["shard"]
            seen = self.shard_info.get(k)
            if seen is not None and seen[0] != st["incarnation"]:
                lost = max(0, seen[1] - (st["restored_version"] or 0))
                self.counters["shard_failures"] += 1
                self.counters["shard_updates_lost"] += lost
                self._log({"kind": "failure", "actor": f"shard {k}", "iteration": self.steps,
                           "wall_s": round(self.wall_s, 3), "updates_lost": lost,
                           "restored_version": st["restored_version"]})
                self._say(f"shard {k} failed and was restarted from its snapshot at version "
                          f"{st['restored_version']} (at least {lost} updates lost)")
            self.shard_info[k] = (st["incarnation"], st["version"])
        return statuses

    # --- the loop ------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until `config.iterations` steps over all replicas, evaluate, return the
        summary."""
        with tempfile.TemporaryDirectory(prefix="distbelief-shards-") as tmp:
            # Without a run directory the shards' snapshots go to a temporary folder.
            self.snapshot_dir = self.run.checkpoint.parent if self.run else Path(tmp)
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            self.snapshot_dir = self.snapshot_dir.resolve()
            return super().fit()

    @property
    def position(self) -> int:
        return self.steps

    @property
    def examples_seen(self) -> int:
        return self.steps * self.config.batch_size

    def _progress_text(self) -> str:
        return f"train error {self.last_train.get('error', float('nan')):.2%}"

    def _train(self) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        c, n = self.config, self.config.replicas
        clock = time.perf_counter
        ray.get(self.shards_started)
        self._wait_for_replicas(self._poll_shards())
        loop_start, wall_before = clock(), self.wall_s
        work = WorkQueue(self.positions, c.iterations, c.warmstart_steps, CHUNK_STEPS,
                         QUEUED_CHUNKS)
        pending: dict = {}  # ObjectRef of a replica's run -> its chunk
        window, window_replicas, window_start = Counter(), [(0, 0.0)] * n, clock()
        next_log = (self.steps // c.log_every + 1) * c.log_every
        next_eval = (self.steps // c.eval_every + 1) * c.eval_every if c.eval_every else math.inf
        next_ckpt = (self.steps // c.checkpoint_every + 1) * c.checkpoint_every \
            if c.checkpoint_every else math.inf
        last_eval_time = clock()
        released = work.completed >= c.warmstart_steps

        def hand_out() -> None:
            if not self._stop:
                for chunk in work.take():
                    r, start, steps = chunk
                    pending[self.replicas[r].run.remote(start, steps)] = chunk

        recovering: dict = {}  # ObjectRef of a ping -> replica that Ray is restarting

        def ping(r: int) -> None:
            # Calls to a restarting actor fail at once (ActorUnavailableError); a replica gets
            # work again only once it answers, so one death counts as one failure.
            if work.alive[r]:
                work.pause(r)
                recovering[self.replicas[r].info.remote()] = r

        try:
            hand_out()
            while pending or recovering:
                ready, _ = ray.wait(list(pending) + list(recovering), num_returns=1,
                                    timeout=POLL_S)
                for ref in ready:
                    if ref in recovering:
                        r = recovering.pop(ref)
                        try:
                            ray.get(ref)
                            work.resume(r)
                        except ActorUnavailableError:
                            time.sleep(0.05)
                            ping(r)
                        except RayActorError as e:  # it died again while restarting
                            self._replica_failed(r, (r, 0, 0), e, work)
                            ping(r)
                        continue
                    if ref not in pending:
                        continue  # dropped with a failed replica
                    chunk = pending.pop(ref)
                    r = chunk[0]
                    try:
                        m = ray.get(ref)
                    except RayTaskError as e:
                        if isinstance(e.cause, DistbeliefError):
                            raise e.cause from None
                        if isinstance(e.cause, RayActorError):  # a shard it needed is gone
                            raise DistbeliefError(
                                f"a parameter-server shard is gone (it failed more than "
                                f"--max-restarts {c.max_restarts} times or its node was lost); "
                                f"--resume continues from the snapshots") from None
                        raise
                    except RayActorError as e:
                        self._replica_failed(r, chunk, e, work)
                        for dropped_ref in [k for k, v in pending.items() if v[0] == r]:
                            del pending[dropped_ref]
                        ping(r)
                        continue
                    if m.get("diverged"):
                        raise Diverged(f"training diverged (loss {m['loss_sum']}) on replica {r} "
                                       f"after {self.steps} steps; lower --lr (the last checkpoint "
                                       f"is kept)")
                    work.finished(chunk)
                    self.positions, self.steps = list(work.positions), work.completed
                    self.replica_images[r] += m["images"]
                    self.replica_seconds[r] += m["seconds"]
                    self.time_split.update({k: m[k] for k in TIME_PARTS})
                    images, seconds = window_replicas[r]
                    window_replicas[r] = (images + m["images"], seconds + m["seconds"])
                    window.update({k: v for k, v in m.items()
                                   if k not in ("replica", "start", "diverged")})
                self.wall_s = wall_before + clock() - loop_start
                if not released and self.steps >= c.warmstart_steps:
                    released = True  # warmstart over: the other replicas get work from now
                    self._log({"kind": "release", "iteration": self.steps,
                               "positions": list(self.positions)})
                if self.steps >= next_log or (not pending and window["steps"]):
                    self._log_train(window, clock() - window_start, window_replicas)
                    window, window_replicas, window_start = Counter(), [(0, 0.0)] * n, clock()
                    next_log = (self.steps // c.log_every + 1) * c.log_every
                hand_out()
                if self.steps >= next_eval or (
                        c.eval_interval_s and clock() - last_eval_time >= c.eval_interval_s):
                    self._evaluate_all()
                    last_eval_time = clock()
                    next_eval = (self.steps // c.eval_every + 1) * c.eval_every \
                        if c.eval_every else math.inf
                if self.steps >= next_ckpt:
                    self.save()
                    next_ckpt = (self.steps // c.checkpoint_every + 1) * c.checkpoint_every
            ray.get([r.drain.remote() for r, ok in zip(self.replicas, work.alive) if ok])
        finally:
            self.wall_s = wall_before + clock() - loop_start
        self.save()
        if self._stop and self.steps < c.iterations:
            raise TrainingInterrupted(f"stopped at iteration {self.steps}; checkpoint saved, "
                                      f"continue with --resume")

    def _replica_failed(self, r: int, chunk: tuple, error: Exception, work: WorkQueue) -> None:
        """Count replica r's failure; Ray restarts it (up to --max-restarts) and it continues
        from its last completed step, or it gets no more work.

        Raises:
            DistbeliefError: no replica is left."""
        c = self.config
        restart = self.counters[f"replica_{r}_restarts"] < c.max_restarts
        work.failed(r, give_up=not restart)
        self.counters["replica_failures"] += 1
        self.counters["replica_steps_lost"] += chunk[2]
        if restart:
            self.counters[f"replica_{r}_restarts"] += 1
            self.counters["replica_restarts"] += 1
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        self._log({"kind": "failure", "actor": f"replica {r}", "iteration": self.steps,
                   "wall_s": round(self.wall_s, 3), "restarted": restart, "error": reason})
        self._say(f"replica {r} failed ({type(error).__name__}); "
                  + ("restarting it" if restart else "giving up on it"))
        if not any(work.alive):
            raise DistbeliefError(f"every replica failed more than --max-restarts "
                                  f"{c.max_restarts} times; last error: {reason}")

    # --- records -------------------------------------------------------------------------

    def _log_train(self, window: Counter, seconds: float, replicas: list) -> None:
        c = self.config
        statuses = self._poll_shards()
        now = time.perf_counter()
        previous = getattr(self, "_previous_poll", None)
        shards = []
        for st in statuses:
            row = {"shard": st["shard"], "version": st["version"], "rejected": st["rejected"]}
            if previous is not None and previous[1].get(st["shard"], {}).get("incarnation") == st["incarnation"]:
                dt, old = max(now - previous[0], 1e-9), previous[1][st["shard"]]
                row["updates_per_s"] = round((st["version"] - old["version"]) / dt, 2)
                row["bytes_per_s"] = round((st["bytes_in"] + st["bytes_out"]
                                            - old["bytes_in"] - old["bytes_out"]) / dt, 1)
            shards.append(row)
        self._previous_poll = (now, {st["shard"]: st for st in statuses})
        images = max(window["images"], 1)
        self.last_train = {
            "kind": "train", "iteration": self.steps, "examples": self.steps * c.batch_size,
            "epoch": round(self.steps * c.batch_size / self.data.train_size, 4),
            "loss": window["loss_sum"] / images, "error": window["wrong"] / images,
            "lr": statuses[0]["lr"], "images_per_s": round(window["images"] / max(seconds, 1e-9), 1),
            "wall_s": round(self.wall_s, 3),
            "compute_s": round(window["compute_s"], 3),
            "fetch_wait_s": round(window["fetch_wait_s"], 3),
            "push_wait_s": round(window["push_wait_s"], 3),
            "rejected": window["rejected"], "shards": shards,
            "replica_images_per_s": [round(i / s, 1) if s else 0.0 for i, s in replicas],
            "staleness_mean": _mean_staleness(_staleness(statuses))}
        self._log(self.last_train)

    def save(self) -> None:
        """Snapshot every shard, then write last.pt (the server's model) and the driver state.
        A server holding NaN or Inf never replaces a good checkpoint."""
        import ray

        if self.run is None:
            return
        ray.get([s.snapshot.remote() for s in self.shards])
        self._write_model(self._finite_server_vector(), "downpour")
        c = self.config
        save_checkpoint(self.run.downpour_state, {
            "config": c.to_dict(), "positions": self.positions, "steps": self.steps,
            "wall_s": self.wall_s, "last_train": self.last_train, "counters": dict(self.counters),
            "replica_images": self.replica_images, "replica_seconds": self.replica_seconds,
            "time_split": dict(self.time_split), "data_stats": self.data.stats})

    def _summarize(self, results: dict) -> dict:
        c, test = self.config, results["test"]
        statuses = self._poll_shards()
        staleness = _staleness(statuses)
        examples = self.steps * c.batch_size
        summary = {
            "recipe": c.recipe, "model": c.model, "data": c.data, "device": str(self.device),
            "mode": "downpour", "replicas": c.replicas, "ps_shards": c.ps_shards,
            "optimizer": c.optimizer, "n_fetch": c.n_fetch, "n_push": c.n_push,
            "iterations": self.steps, "examples": examples,
            "epochs": round(examples / self.data.train_size, 3),
            "test_error": test["error"], "test_accuracy": 1 - test["error"],
            "test_top5_error": test["top5_error"], "test_loss": test["loss"],
            "train_error": self.last_train.get("error"), "train_loss": self.last_train.get("loss"),
            "wall_s": round(self.wall_s, 3),
            "images_per_s": round(examples / max(self.wall_s, 1e-9), 1),
            "replica_images_per_s": [round(i / max(s, 1e-9), 1) for i, s in
                                     zip(self.replica_images, self.replica_seconds)],
            "replica_failures": self.counters["replica_failures"],
            "replica_restarts": self.counters["replica_restarts"],
            "replica_steps_lost": self.counters["replica_steps_lost"],
            "shard_failures": self.counters["shard_failures"],
            "shard_updates_lost": self.counters["shard_updates_lost"],
            "rejected_pushes": sum(st["rejected"] for st in statuses),
            "shard_updates": [st["version"] for st in statuses],
            "shard_updates_per_s": [round(st["version"] / max(self.wall_s, 1e-9), 2)
                                    for st in statuses],
            "shard_bytes_per_s": [round((st["bytes_in"] + st["bytes_out"]) / max(self.wall_s, 1e-9), 1)
                                  for st in statuses],
            "staleness": dict(sorted(staleness.items())),
            "staleness_mean": _mean_staleness(staleness),
            # Where the replicas' time went: computing, blocked on a fetch or on the in-flight
            # push bound, and the rest (sending, installing parameters, flattening gradients).
            "replica_time_s": {
                **{k: round(self.time_split[k], 3) for k in TIME_PARTS},
                "other_s": round(sum(self.replica_seconds)
                                 - sum(self.time_split[k] for k in TIME_PARTS), 3)},
        }
        if "val" in results:
            summary["val_error"] = results["val"]["error"]
        if self.run is not None:
            self.run.write_summary(summary)
        return summary


def _staleness(statuses: list[dict]) -> Counter:
    """All shards' staleness histograms added up: versions behind -> pushes."""
    total = Counter()
    for st in statuses:
        total.update({int(k): v for k, v in st["staleness"].items()})
    return total


def _mean_staleness(histogram: Counter) -> float:
    count = sum(histogram.values())
    return round(sum(k * v for k, v in histogram.items()) / count, 3) if count else 0.0
