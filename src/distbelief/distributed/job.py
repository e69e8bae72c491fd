"""What the Downpour driver and the Sandblaster coordinator share: Ray's lifetime around a run,
waiting for the replicas, evaluating the server's parameters, records."""

from __future__ import annotations

import sys

from distbelief.engine.evaluate import evaluate
from distbelief.errors import DistbeliefError

START_TIMEOUT_S = 300  # replicas that cannot be placed (resources) fail the run after this


class RayJob:
    """Base of `DownpourTrainer` and `SandblasterTrainer`.

    Subclasses set `run`, `address`, `dashboard`, `progress`, `config`, `data`, `model`,
    `replicas`, `shards`, `wall_s`, `last_train`, `_stop` and `_last_eval`, and provide
    `position` (iterations done), `examples_seen`, `_start_actors()`, `_train()`,
    `server_vector()`, `_summarize(results)` and `_progress_text()` (the evaluation line's
    training part).
    """

    def _open_run(self, config, run_dir, resume: bool, state_file: str, same: tuple[str, ...],
                  address: str | None, dashboard: bool, progress: bool) -> dict | None:
        """Set up the run directory and the Ray options; returns the driver's saved state (the
        RunDir attribute `state_file`) when resuming, else None. Nothing is written here.

        Raises:
            ConfigError: --resume without a run directory.
            CheckpointError: the run was trained with other values of the fields in `same`,
                or in another mode.
            DistbeliefError: `address` cannot be reached (checked before anything is touched).
        """
        from distbelief.engine.checkpoint import load_checkpoint
        from distbelief.engine.config import TrainConfig
        from distbelief.engine.rundir import RunDir
        from distbelief.errors import CheckpointError, ConfigError

        self.run = RunDir(run_dir) if run_dir is not None else None
        self.address, self.dashboard, self.progress = address, dashboard, progress
        state = None
        if resume:
            if self.run is None:
                raise ConfigError("--resume needs --out RUN_DIR")
            path = getattr(self.run, state_file)
            if path.exists():
                state = load_checkpoint(path)
                saved = TrainConfig.from_dict(state["config"])
                for name in same:
                    if getattr(saved, name) != getattr(config, name):
                        raise CheckpointError(
                            f"{self.run.path} was trained with --{name.replace('_', '-')} "
                            f"{getattr(saved, name)}, not {getattr(config, name)}")
            elif self.run.checkpoint.exists():
                mode = load_checkpoint(self.run.checkpoint).get("mode", "single")
                raise CheckpointError(f"{self.run.path} holds a {mode} run; resume it with "
                                      f"--mode {mode}")
        elif self.run is not None:
            self.run.refuse_if_occupied()
        if address:
            from distbelief.distributed.actors import check_reachable

            check_reachable(address)  # fail fast, before the run directory is touched
        return state

    def request_stop(self) -> None:
        """Stop after the current unit of work, checkpoint, raise TrainingInterrupted (from a
        signal handler)."""
        self._stop = True

    def fit(self) -> dict:
        """Train, evaluate, return the summary. Without `address` a local Ray is started and
        shut down at the end (unless Ray is already initialized in this process, as in tests);
        the actors are killed whatever happens."""
        from distbelief.distributed.actors import start_ray

        started = start_ray(self.address, self.dashboard)
        try:
            self._start_actors()
            try:
                self._train()
                results = self._last_eval
                if results is None or results["test"]["iteration"] != self.position:
                    results = self._evaluate_all()
                return self._summarize(results)
            finally:
                self._stop_actors()
        finally:
            if started:
                import ray

                ray.shutdown()

    def _stop_actors(self) -> None:
        import ray

        for actor in self.replicas + self.shards:
            ray.kill(actor, no_restart=True)
        self.replicas, self.shards = [], []

    def _wait_for_replicas(self, shards: list[dict]) -> None:
        """Wait until every replica answers, then log the cluster record (`shards`: the shards'
        statistics).

        Raises:
            DistbeliefError: some replica was not placed within START_TIMEOUT_S."""
        import ray

        refs = [r.info.remote() for r in self.replicas]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if len(ready) < len(refs):
            raise DistbeliefError(
                f"only {len(ready)} of {self.config.replicas} replicas started within "
                f"{START_TIMEOUT_S} s; the cluster has {ray.cluster_resources().get('CPU', 0):g} "
                f"CPUs and {ray.cluster_resources().get('GPU', 0):g} GPUs (see --replica-cpus)")
        self._log({"kind": "cluster", "iteration": self.position, "replicas": ray.get(refs),
                   "shards": [{k: st[k] for k in ("shard", "node", "elements")}
                              for st in shards]})

    def _evaluate_all(self) -> dict:
        """Evaluate the server's parameters on every split, log and return the records."""
        from distbelief.distributed.shard import load_model_vector

        load_model_vector(self.model, self.server_vector())
        results = {}
        for split, source in self.data.splits.items():
            r = {"kind": "eval", "split": split, "iteration": self.position,
                 "examples": self.examples_seen, "wall_s": round(self.wall_s, 3),
                 **evaluate(self.model, source.batches(), channels_last=self.config.channels_last,
                            bf16=self.config.bf16)}
            results[split] = r
            self._log(r)
        self._say(f"iteration {self.position}/{self.config.iterations} ({self.wall_s:.1f} s): "
                  f"{self._progress_text()}, test error {results['test']['error']:.2%}")
        self._last_eval = results
        return results

    def _finite_server_vector(self):
        """The server's parameters.

        Raises:
            Diverged: some are NaN or infinite (the caller's last checkpoint is kept)."""
        import torch

        from distbelief.engine.trainer import Diverged

        vector = self.server_vector()
        if not bool(torch.isfinite(vector).all()):
            raise Diverged(f"the server's parameters are not finite at iteration "
                           f"{self.position}; lower --lr (the last checkpoint is kept)")
        return vector

    def _write_model(self, vector, mode: str) -> None:
        """checkpoints/last.pt: the model at `vector`, an ordinary checkpoint for
        `distbelief eval` (with `mode`, which --resume checks)."""
        from distbelief.distributed.shard import load_model_vector
        from distbelief.engine.checkpoint import save_checkpoint

        load_model_vector(self.model, vector)
        save_checkpoint(self.run.checkpoint, {
            "config": self.config.to_dict(), "iteration": self.position,
            "model": self.model.state_dict(), "data_stats": self.data.stats,
            "num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
            "wall_s": self.wall_s, "mode": mode})

    def _log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(record)

    def _say(self, message: str) -> None:
        if self.progress:
            print(f"distbelief: {message}", file=sys.stderr)
