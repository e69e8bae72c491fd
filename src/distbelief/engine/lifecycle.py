"""The life of one training run, the same in every mode.

A training scheme (the single-process `Trainer`, `DownpourTrainer`, `SandblasterTrainer`) is
handed a `RunLifecycle` and calls it; the lifecycle owns what every mode does alike:

    life = RunLifecycle(run_dir, mode="downpour", state="downpour", progress=True)
    saved = life.open(config, resume, same=("model", "replicas"))  # checks; writes nothing
    ...                                                            # data, model, config
    summary = life.fit(scheme)                                     # see `Scheme`

- The run directory: nothing is written until the scheme has started (its data, its Ray
  cluster and its actors are there), so a run that cannot start leaves nothing behind; a new
  run never overwrites another; a resumed run must be of the same mode and shape (the fields in
  `same`), drops the records after its checkpoint and logs a `resume` record; one stopped
  before its first checkpoint starts over with a clean history.
- The cadence of records, evaluations and checkpoints (`cadences`: every N iterations, and for
  evaluations and checkpoints also every S seconds of wall time, so that a run killed outright
  loses at most --checkpoint-interval-s).
- Signals: the first SIGINT (Ctrl-C) or SIGTERM (what clusters and cloud machines send before
  they stop a job) asks the scheme to stop after its current unit of work and to checkpoint
  (`TrainingInterrupted`, which carries the signal); a second one aborts at once, without a
  checkpoint.
- The failure book (`FailureBook`): one death of an actor is one failure; restarts up to
  --max-restarts; what each failure lost.
- Records (metrics.jsonl), evaluation of every split, progress lines on stderr, the summary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Protocol

import torch

from distbelief.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import evaluate
from distbelief.engine.losses import error_text
from distbelief.engine.rundir import RunDir
from distbelief.engine.tensorboard import EventWriter, check_available
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(DistbeliefError):
    """Training stopped on request (Ctrl-C, SIGTERM, `request_stop`) after writing a
    checkpoint; `signum` is the signal that asked for it (None: a call)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class Diverged(DistbeliefError):
    """The training loss (or the parameters) became NaN or infinite."""


class Scheme(Protocol):
    """What a training scheme offers its lifecycle. `train` runs until `config.iterations`,
    convergence or a stop request (`RunLifecycle.stop_requested`), checkpointing on the way;
    `eval_model` is the model at the current parameters, on the device of `data`."""

    config: TrainConfig
    data: object  # DataBundle: its splits are evaluated
    device: torch.device

    @property
    def position(self) -> int: ...  # iterations done

    @property
    def examples(self) -> int: ...  # training images processed

    def start(self) -> None: ...

    def train(self) -> None: ...

    def eval_model(self) -> torch.nn.Module: ...

    def progress_text(self) -> str: ...  # "train error 1.2%", for the evaluation line

    def summary(self) -> dict: ...  # the scheme's own summary entries

    def close(self) -> None: ...  # runs whatever happened


class Cadence:
    """Due every `every` iterations (0: never) and, with `interval_s`, also every that many
    seconds; `done(position)` after acting on it."""

    def __init__(self, every: int, position: int, interval_s: float = 0.0,
                 clock=time.monotonic):
        self.every, self.interval_s, self.clock = every, interval_s, clock
        self.done(position)

    def due(self, position: int) -> bool:
        return position >= self.next or bool(
            self.interval_s and self.clock() - self.last >= self.interval_s)

    def done(self, position: int) -> None:
        self.next = (position // self.every + 1) * self.every if self.every else float("inf")
        self.last = self.clock()


class Cadences:
    """When to log a training record, evaluate and checkpoint, from the config."""

    def __init__(self, config: TrainConfig, position: int):
        self.log = Cadence(config.log_every, position)
        self.eval = Cadence(config.eval_every, position, config.eval_interval_s)
        self.checkpoint = Cadence(config.checkpoint_every, position,
                                  config.checkpoint_interval_s)


class Stopwatch:
    """Wall time over all resumes of a run: what earlier runs took plus the time since
    `start()`."""

    def __init__(self, before: float = 0.0):
        self.before, self.started = before, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.before, self.started = self.seconds, None

    @property
    def seconds(self) -> float:
        if self.started is None:
            return self.before
        return self.before + time.perf_counter() - self.started


def describe(error: BaseException) -> str:
    """An error's first line (at most 200 characters), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class RunLifecycle:
    """One run's directory, records, cadence, signals, evaluation and summary (module doc).

    `run_dir` None keeps everything in memory (tests, benchmarks). `state` names the scheme's
    checkpoint, checkpoints/STATE.pt, from which --resume continues."""

    def __init__(self, run_dir: str | os.PathLike | None, *, mode: str, state: str,
                 progress: bool = False):
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.mode, self.state, self.progress = mode, state, progress
        self.counters: Counter = Counter()  # failures, restarts and the scheme's own counts
        self.clock = Stopwatch()
        self.last_train: dict = {}
        self.last_eval: dict | None = None
        self.evaluated: torch.nn.Module | None = None  # the model of the last evaluation
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.resuming = False
        self.saved: dict | None = None
        self.begun = False
        self.events: EventWriter | None = None  # --tensorboard

    # --- opening --------------------------------------------------------------------------

    def open(self, config: TrainConfig, resume: bool, same: tuple[str, ...] = ()) -> dict | None:
        """Check that the run can start or continue; nothing is written. Returns the saved
        state to continue from, or None (a new run, or one stopped before its first
        checkpoint, which starts over).

        The saved state's clock, counters and last training record become the lifecycle's.

        Raises:
            ConfigError: a new run in a folder that holds one; --resume without a run.
            CheckpointError: the run is of another mode, was trained with other values of the
                fields in `same`, or its checkpoint is unreadable."""
        self.resuming = resume
        if config.tensorboard:
            if self.run is None:
                raise ConfigError("--tensorboard needs a run directory")
            check_available()
        self.saved = self._open(config, resume, same)
        if self.saved is not None:
            self.load_state_dict(self.saved)
        return self.saved

    def _open(self, config: TrainConfig, resume: bool, same: tuple[str, ...]) -> dict | None:
        if not resume:
            if self.run is not None:
                self.run.refuse_if_occupied()
            return None
        if self.run is None:
            raise ConfigError("--resume needs --out RUN_DIR")
        mode = self.run.read_config().mode  # raises when there is no config.yaml
        if mode != self.mode:
            raise CheckpointError(f"{self.run.path} holds a {mode} run; resume it with "
                                  f"--mode {mode}")
        path = self.run.state_file(self.state)
        if not path.is_file():
            if self.run.checkpoint.is_file():  # a distributed run's last.pt without its state
                raise CheckpointError(f"{path} is missing: the run cannot be resumed")
            return None
        state = load_checkpoint(path)
        saved = TrainConfig.from_dict(state["config"])
        for name in same:
            if saved.get(name) != config.get(name):
                raise CheckpointError(
                    f"{self.run.path} was trained with --{name.replace('_', '-')} "
                    f"{saved.get(name)}, not {config.get(name)}")
        return state

    def begin(self, scheme: Scheme) -> None:
        """Start writing, once: a new run directory, or the resumed one (records after the
        scheme's position dropped, a `resume` record, the config it continues with). `fit` calls
        it once the scheme has started; a scheme that trains without `fit` calls it first."""
        if self.begun or self.run is None:
            self.begun = True
            return
        self.begun = True
        if scheme.config.tensorboard:
            # A resumed run's events after its checkpoint are hidden, as its records are dropped.
            self.events = EventWriter(self.run.path / "tensorboard",
                                      purge_step=scheme.position + 1 if self.resuming else None)
        if not self.resuming:
            self.run.create(scheme.config, str(scheme.device))
            return
        self.run.truncate_metrics(scheme.position)
        self.run.log({"kind": "resume", "iteration": scheme.position})
        self.run.update_config(scheme.config)

    # --- running --------------------------------------------------------------------------

    def fit(self, scheme: Scheme) -> dict:
        """Start the scheme, begin the run directory, train, evaluate the final parameters
        unless the last evaluation was of them, write and return the summary; `scheme.close()`
        runs whatever happens, a failed start included (so it must cope with a scheme that
        started only in part)."""
        with self.signals():
            try:
                scheme.start()
                self.begin(scheme)
                scheme.train()
                results = self.last_eval
                if results is None or _main(results)["iteration"] != scheme.position:
                    results = self.evaluate(scheme)
                return self.summary(scheme, results)
            finally:
                scheme.close()
                if self.events is not None:
                    self.events.close()

    def request_stop(self) -> None:
        """Ask the scheme to stop after its current unit of work and checkpoint (safe from a
        signal handler or another thread)."""
        self.stop_requested = True

    @contextlib.contextmanager
    def signals(self):
        """Within: the first SIGINT or SIGTERM requests a stop; a second one raises at once
        (KeyboardInterrupt, or SystemExit(143) for SIGTERM), skipping the checkpoint but not
        the scheme's `close`. Only the main thread can install handlers; elsewhere this does
        nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.stop_signal = signum
            self.request_stop()
            print(f"\ndistbelief: {name}: stopping after this step and checkpointing "
                  f"({name} again to stop at once)", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def interrupted(self, position: int) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped at iteration {position}; checkpoint saved, "
                                   f"continue with --resume", self.stop_signal)

    @property
    def wall_s(self) -> float:
        return self.clock.seconds

    def cadences(self, config: TrainConfig, position: int) -> "Cadences":
        return Cadences(config, position)

    # --- records --------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(record)
        if self.events is not None:
            self.events.write(record)

    def log_train(self, record: dict) -> None:
        """Log a training record and keep it for the summary and the checkpoint."""
        self.last_train = record
        self.log(record)

    def say(self, message: str) -> None:
        """A progress line on stderr (with `progress`), printed above a progress bar."""
        if self.progress:
            from tqdm import tqdm

            tqdm.write(f"distbelief: {message}", file=sys.stderr)

    def evaluate(self, scheme: Scheme) -> dict:
        """Evaluate the scheme's model on every split; log, print and return the records."""
        model, c = scheme.eval_model(), scheme.config
        results = {}
        for split, source in scheme.data.splits.items():
            r = {"kind": "eval", "split": split, "iteration": scheme.position,
                 "examples": scheme.examples, "wall_s": round(self.wall_s, 3),
                 **evaluate(model, source.batches(), channels_last=c.channels_last,
                            bf16=c.bf16, loss=c.loss)}
            results[split] = r
            self.log(r)
        main = _main(results)
        self.say(f"iteration {scheme.position}/{c.iterations} ({self.wall_s:.1f} s): "
                 f"{scheme.progress_text()}, {error_text(main, main['split'])}")
        self.last_eval, self.evaluated = results, model
        return results

    def summary(self, scheme: Scheme, results: dict) -> dict:
        """The run's summary (`run_summary`), written to summary.json."""
        summary = run_summary(scheme, results, self.last_train, self.wall_s)
        if self.run is not None:
            self.run.write_summary(summary)
        return summary

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"wall_s": self.wall_s, "last_train": self.last_train,
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.clock = Stopwatch(state["wall_s"])
        self.last_train = state.get("last_train", {})
        self.counters = Counter(state.get("counters", {}))

    def save_state(self, config: TrainConfig, state: dict) -> None:
        """Write checkpoints/STATE.pt atomically: the scheme's `state` beside the config, the
        mode and the lifecycle's clock, counters and last training record."""
        if self.run is not None:
            save_checkpoint(self.run.checkpoints / f"{self.state}.pt",
                            self._with_own(config, state))

    def save_generation(self, config: TrainConfig, state: dict, files: dict[str, dict],
                        position: int) -> None:
        """One consistent checkpoint of a distributed run: the scheme's `state` (as in
        `save_state`) and its actors' `files` (name -> state; "last" is the model, which is
        also copied to checkpoints/last.pt for `distbelief eval`) in a new generation, published
        by its manifest (`RunDir.write_generation`)."""
        if self.run is None:
            return
        folder = self.run.write_generation(
            {**files, self.state: self._with_own(config, state)}, position)
        if "last" in files:
            atomic_write(self.run.checkpoint,
                         lambda f: f.write((folder / "last.pt").read_bytes()))

    def _with_own(self, config: TrainConfig, state: dict) -> dict:
        return {**state, **self.state_dict(), "config": config.to_dict(), "mode": self.mode}


class FailureBook:
    """Failures of a run's actors, each death counted once (module doc).

    `replica_failed` decides whether replica r is restarted (fewer than `max_restarts`
    restarts so far) or given up, counts and records the failure, and raises when no replica is
    left; `shard_restarted` records a shard that Ray restarted from its snapshot."""

    def __init__(self, life: RunLifecycle, replicas: int, max_restarts: int):
        self.life, self.max_restarts = life, max_restarts
        self.alive = set(range(replicas))

    def replica_failed(self, r: int, error: BaseException, position: int) -> bool:
        """Returns whether Ray restarts the replica.

        Raises:
            DistbeliefError: every replica is given up."""
        counters = self.life.counters
        restart = counters[f"replica_{r}_restarts"] < self.max_restarts
        counters["replica_failures"] += 1
        if restart:
            counters[f"replica_{r}_restarts"] += 1
            counters["replica_restarts"] += 1
        else:
            self.alive.discard(r)
        reason = describe(error)
        self.life.log({"kind": "failure", "actor": f"replica {r}", "iteration": position,
                       "wall_s": round(self.life.wall_s, 3), "restarted": restart,
                       "error": reason})
        self.life.say(f"replica {r} failed ({type(error).__name__}); "
                      + ("restarting it" if restart else "giving up on it"))
        if not self.alive:
            raise DistbeliefError(f"every replica failed more than --max-restarts "
                                  f"{self.max_restarts} times; last error: {reason}")
        return restart

    def shard_restarted(self, k: int, position: int, restored_version: int | None,
                        lost: int) -> None:
        """Shard k was restarted from its snapshot at `restored_version`, losing `lost`
        updates (at least)."""
        self.life.counters["shard_failures"] += 1
        self.life.counters["shard_updates_lost"] += lost
        self.life.log({"kind": "failure", "actor": f"shard {k}", "iteration": position,
                       "wall_s": round(self.life.wall_s, 3), "updates_lost": lost,
                       "restored_version": restored_version})
        self.life.say(f"shard {k} failed and was restarted from its snapshot at version "
                      f"{restored_version} (at least {lost} updates lost)")


def run_summary(scheme: Scheme, results: dict, last_train: dict, wall_s: float) -> dict:
    """What every mode reports (from the scheme, the last evaluations `results` and training
    record `last_train`), then the scheme's own entries, which may replace them."""
    c = scheme.config
    summary = {
        "recipe": c.recipe, "model": c.model, "data": c.data,
        "device": str(scheme.device), "mode": c.mode, "iterations": scheme.position,
        "examples": scheme.examples,
        "epochs": round(scheme.examples / scheme.data.train_size, 3),
        "train_error": last_train.get("error"),
        "train_loss": last_train.get("loss"), "wall_s": round(wall_s, 3),
        "images_per_s": round(scheme.examples / max(wall_s, 1e-9), 1),
        **scheme.summary()}
    if "test" in results:
        test = results["test"]
        summary["test_loss"] = test["loss"]
        if test["error"] is not None:  # a classifier (--loss mse has no error rate)
            summary.update(test_error=test["error"], test_accuracy=1 - test["error"],
                           test_top5_error=test["top5_error"])
    # Other splits: "val" (--val-split); "train", evaluated in full when a run through
    # the Python API has no test data (it replaces the running training averages).
    for split in results.keys() - {"test"}:
        summary[f"{split}_error"] = results[split]["error"]
        summary[f"{split}_loss"] = results[split]["loss"]
    return summary


def _main(results: dict) -> dict:
    """The evaluation the progress line and the end of a run go by: the test split's, else
    the only one there is (a run through the Python API without test data: "train")."""
    return results["test"] if "test" in results else next(iter(results.values()))
