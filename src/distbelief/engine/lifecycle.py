"""The life of one training run, the same in every mode.

Every trainer (`engine.base.BaseTrainer`: one per scheme) holds a `RunLifecycle` and calls
it; the lifecycle owns what every mode does alike:

    life = RunLifecycle(run_dir, mode="downpour", state="downpour", progress=True)
    ready = life.prepare(config, resume, same=("model", "replicas"))  # writes nothing
    ...                                          # the trainer builds its model, actors ...
    summary = life.fit(trainer)                  # start, train, evaluate, summary, close

- The preamble (`prepare`): the checks that the run can start or continue, the device, the
  seed, the data and the config resolved for it, in the same order in every mode.
- The run directory: nothing is written until the trainer has started (its data, its Ray
  cluster and its actors are there), so a run that cannot start leaves nothing behind; a new
  run never overwrites another; a resumed run must be of the same mode and shape (the fields in
  `same`), drops the records after its checkpoint and logs a `resume` record; one stopped
  before its first checkpoint starts over with a clean history.
- The cadence of records, evaluations and checkpoints (`cadences`: every N iterations, and for
  evaluations and checkpoints also every S seconds of wall time, so that a run killed outright
  loses at most --checkpoint-interval-s).
- Signals: the first SIGINT (Ctrl-C) or SIGTERM (what clusters and cloud machines send before
  they stop a job) asks the trainer to stop after its current unit of work and to checkpoint
  (`TrainingInterrupted`, which carries the signal); a second one aborts at once, without a
  checkpoint.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distbelief.data import DataBundle, build_data
from distbelief.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig, resolve
from distbelief.engine.evaluate import evaluate, recalibrate_for
from distbelief.engine.losses import error_text
from distbelief.engine.rundir import RunDir, RunLock, read_jsonl
from distbelief.engine.setup import resolve_device
from distbelief.engine.tensorboard import EventWriter, check_available
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError, storage_error

if TYPE_CHECKING:
    from distbelief.engine.base import BaseTrainer

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EVAL_KEYS = {"split", "loss", "error", "top5_error", "images"}  # what an eval record holds


class TrainingInterrupted(DistbeliefError):
    """Training stopped on request (Ctrl-C, SIGTERM, `request_stop`) after writing a
    checkpoint, or before training began without writing anything; `signum` is the signal
    that asked for it (None: a call), `resumable` whether the run folder holds a run that
    --resume continues."""

    def __init__(self, message: str, signum: int | None = None, resumable: bool = True):
        super().__init__(message)
        self.signum, self.resumable = signum, resumable


class Diverged(DistbeliefError):
    """The training loss (or the parameters) became NaN or infinite."""


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

    `run_dir` None keeps everything in memory (tests, benchmarks). `state` names the trainer's
    checkpoint, checkpoints/STATE.pt, from which --resume continues."""

    def __init__(self, run_dir: str | os.PathLike | None, *, mode: str, state: str,
                 progress: bool = False):
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.mode, self.state, self.progress = mode, state, progress
        self.counters: Counter = Counter()  # failures, restarts and the trainer's own counts
        self.clock = Stopwatch()
        self.last_train: dict = {}
        self.last_eval: dict | None = None
        self.evaluated: torch.nn.Module | None = None  # the model of the last evaluation
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.resuming = False
        self.saved: dict | None = None
        self.begun = False
        self.resumed_at: int | None = None  # the position a resumed run began at
        self.lock: RunLock | None = None  # held from the first write (a resume: from `open`)
        self.events: EventWriter | None = None  # --tensorboard

    # --- opening --------------------------------------------------------------------------

    def prepare(self, config: TrainConfig, resume: bool, same: tuple[str, ...] = (),
                device: str = "cpu", assemble: bool = True) -> "Prepared":
        """The preamble of every trainer, in this order (a run's initial values depend on it):
        check that the run can start or continue (`open`), resolve `device` ("auto", "cpu",
        "cuda"), seed torch with `config.seed`, build the data there (normalized with the
        saved statistics on resume) and resolve the config for it (`config.resolve`). Nothing
        is written.

        Raises:
            ConfigError, DataError, CheckpointError: as `open` and `build_data`."""
        try:
            saved = self.open(config, resume, same, assemble)
            where = resolve_device(device)
            torch.manual_seed(config.seed)
            data = build_data(config, where, stats=saved["data_stats"] if saved else None)
            return Prepared(resolve(config, data.train_size), data, where, saved)
        except BaseException:
            self.release()  # a resumed run's folder, locked by `open`
            raise

    def open(self, config: TrainConfig, resume: bool, same: tuple[str, ...] = (),
             assemble: bool = True) -> dict | None:
        """Check that the run can start or continue; nothing is written. Returns the saved
        state to continue from (`load_checkpoint`'s, with `assemble`), or None (a new run, or
        one stopped before its first checkpoint, which starts over).

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
        if not resume:
            if self.run is not None:
                self.run.refuse_if_occupied()
                self.run.check_writable()
            self.saved = None
        elif self.run is None:
            raise ConfigError("--resume needs --out RUN_DIR")
        else:
            self.run.require_run()
            self.run.check_writable()
            self.lock = self.lock or self.run.lock()  # one writer, from before the first read
            self.saved = saved_state(self.run, self.mode, self.state, config, same, assemble)
        if self.saved is not None:
            self.load_state_dict(self.saved)
        return self.saved

    def begin(self, trainer: BaseTrainer) -> None:
        """Start writing, once: a new run directory, or the resumed one (records after the
        trainer's position dropped, a `resume` record, the config it continues with). `fit` calls
        it once the trainer has started; a trainer that trains without `fit` calls it first."""
        if self.begun or self.run is None:
            self.begun = True
            return
        self.begun = True
        if trainer.config.tensorboard:
            # A resumed run's events after its checkpoint are hidden, as its records are dropped.
            self.events = EventWriter(self.run.path / "tensorboard",
                                      purge_step=trainer.position + 1 if self.resuming else None)
        if not self.resuming:
            try:
                self.run.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise storage_error("create", self.run.path, e) from None
            self.lock = self.run.lock()
            self.run.create(trainer.config, str(trainer.device))
            return
        self.resumed_at = trainer.position
        if trainer.position >= trainer.config.iterations and evals_at(self.run, trainer):
            return  # a finished run: nothing to train, nothing to record
        self.run.truncate_metrics(trainer.position)
        self.run.log({"kind": "resume", "iteration": trainer.position})
        self.run.update_config(trainer.config)

    # --- running --------------------------------------------------------------------------

    def fit(self, trainer: BaseTrainer) -> dict:
        """Start the trainer, begin the run directory, train, evaluate the final parameters
        unless the last evaluation was of them, write and return the summary; `trainer.close()`
        runs whatever happens, a failed start included (so it must cope with a trainer that
        started only in part)."""
        with stop_on_signals(self):
            try:
                trainer.start()
                if self.stop_requested:  # a signal while starting: leave the folder as it was
                    raise self.interrupted_before_start()
                self.begin(trainer)
                trainer.train()
                results = self.last_eval
                if results is None or _main(results)["iteration"] != trainer.position:
                    results = self.recorded_evals(trainer) or self.evaluate(trainer)
                return self.summary(trainer, results)
            finally:
                trainer.close()
                if self.events is not None:
                    self.events.close()
                self.release()

    def release(self) -> None:
        """Let go of the run folder (its lock); `fit` does at its end."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def request_stop(self) -> None:
        """Ask the trainer to stop after its current unit of work and checkpoint (safe from a
        signal handler or another thread)."""
        self.stop_requested = True

    def interrupted(self, position: int) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped at iteration {position}; checkpoint saved, "
                                   f"continue with --resume", self.stop_signal)

    def interrupted_before_start(self) -> TrainingInterrupted:
        if self.resuming:
            return TrainingInterrupted("stopped before training resumed; the run is as it was, "
                                       "continue with --resume", self.stop_signal)
        return TrainingInterrupted("stopped before training began; nothing was written",
                                   self.stop_signal, resumable=False)

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

    def evaluate(self, trainer: BaseTrainer) -> dict:
        """Evaluate the trainer's model on every split; log, print and return the records."""
        model, c = trainer.eval_model(), trainer.config
        # --bn-recalibrate: the statistics re-estimated at these weights first (precise BN).
        recalibrated = recalibrate_for(model, c, trainer.data, trainer.position)
        results = {}
        for split, source in trainer.data.splits.items():
            r = {"kind": "eval", "split": split, "iteration": trainer.position,
                 "examples": trainer.examples, "wall_s": round(self.wall_s, 3),
                 **evaluate(model, source.batches(), channels_last=c.channels_last,
                            bf16=c.bf16, loss=c.loss),
                 **({"bn_recalibrated": recalibrated} if recalibrated else {})}
            results[split] = r
            self.log(r)
        main = _main(results)
        self.say(f"iteration {trainer.position}/{c.iterations} ({self.wall_s:.1f} s): "
                 f"{_trained(trainer, self.last_train)}{error_text(main, main['split'])}")
        self.last_eval, self.evaluated = results, model
        return results

    def recorded_evals(self, trainer: BaseTrainer) -> dict | None:
        """A resumed run that trained nothing (it had finished): the evaluations its records
        already hold at this position, one per split, instead of new ones that would repeat
        them; None otherwise."""
        results = self.resumed_at == trainer.position and evals_at(self.run, trainer)
        if results:
            self.evaluated = trainer.eval_model()
        return results or None

    def summary(self, trainer: BaseTrainer, results: dict) -> dict:
        """The run's summary (`run_summary`), written to summary.json."""
        summary = run_summary(trainer, results, self.last_train, self.wall_s)
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
        """Write checkpoints/STATE.pt atomically: the trainer's `state` beside the config, the
        mode and the lifecycle's clock, counters and last training record."""
        if self.run is not None:
            save_checkpoint(self.run.checkpoints / f"{self.state}.pt",
                            self._with_own(config, state))
            self.run.drop_generations()  # older now (a partitioned run resumed whole)

    def save_generation(self, config: TrainConfig, state: dict, files: dict[str, dict],
                        position: int, folder=None, pieces: tuple[str, ...] = ()) -> None:
        """The trainer's `state` (as `save_state`) and its actors' `files` (name -> state;
        "last", the model, is copied to checkpoints/last.pt too) as one generation, new or
        `folder` where they wrote `pieces` (`RunDir.publish_generation`)."""
        if self.run is None:
            return
        files = {**files, self.state: self._with_own(config, state)}
        folder = self.run.publish_generation(folder or self.run.new_generation(), files,
                                             position, pieces)
        if "last" in files:
            atomic_write(self.run.checkpoint,
                         lambda f: f.write((folder / "last.pt").read_bytes()))

    def _with_own(self, config: TrainConfig, state: dict) -> dict:
        return {**state, **self.state_dict(), "config": config.to_dict(), "mode": self.mode}


def run_summary(trainer: BaseTrainer, results: dict, last_train: dict, wall_s: float) -> dict:
    """What every mode reports (from the trainer, the last evaluations `results` and training
    record `last_train`), then the trainer's own entries, which may replace them."""
    c = trainer.config
    summary = {
        "recipe": c.recipe, "model": c.model, "data": c.data,
        "device": str(trainer.device), "mode": c.mode, "iterations": trainer.position,
        "examples": trainer.examples,
        "epochs": round(trainer.examples / trainer.data.train_size, 3),
        "train_error": last_train.get("error"),
        "train_loss": last_train.get("loss"), "wall_s": round(wall_s, 3),
        "images_per_s": round(trainer.examples / max(wall_s, 1e-9), 1),
        **trainer.summary()}
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


def evals_at(run: RunDir | None, trainer: BaseTrainer) -> dict | None:
    """The evaluation records of every split at the trainer's position in `run`'s records, or
    None if a split has none there."""
    if run is None:
        return None
    results = {r.get("split"): r for r in read_jsonl(run.metrics_file)
               if r.get("kind") == "eval" and r.get("iteration") == trainer.position
               and EVAL_KEYS <= r.keys()}
    return results if set(results) == set(trainer.data.splits) else None


def _trained(trainer, last_train: dict) -> str:
    """What the evaluation line says of training first: nothing before the first training
    record (an evaluation due before the log is), not a NaN."""
    return f"{trainer.progress_text()}, " if last_train else ""


def _main(results: dict) -> dict:
    """The evaluation the progress line and the end of a run go by: the test split's, else
    the only one there is (a run through the Python API without test data: "train")."""
    return results["test"] if "test" in results else next(iter(results.values()))


@dataclass
class Prepared:
    """What `RunLifecycle.prepare` hands a trainer."""

    config: TrainConfig  # of the trainer's mode, resolved for its data
    data: DataBundle
    device: torch.device
    saved: dict | None  # the state a resumed run continues from


def saved_state(run: RunDir, mode: str, state: str, config: TrainConfig,
                same: tuple[str, ...], assemble: bool = True) -> dict | None:
    """The state in `run` that a resumed `mode` run continues from (checkpoints/STATE.pt), or
    None for a run stopped before its first checkpoint.

    Raises:
        CheckpointError: the run is of another mode, was trained with other values of the
            fields in `same`, or its checkpoint is unreadable or missing."""
    held = run.read_config().mode  # raises when there is no config.yaml
    if held != mode:
        raise CheckpointError(f"{run.path} holds a {held} run; resume it with --mode {held}")
    path = run.state_file(state)
    if not path.is_file():
        if run.checkpoint.is_file():  # a distributed run's last.pt without its state
            raise CheckpointError(f"{path} is missing: the run cannot be resumed")
        return None
    saved = load_checkpoint(path, assemble=assemble)
    before = TrainConfig.from_dict(saved["config"])
    for name in same:
        if before.get(name) != config.get(name):
            raise CheckpointError(
                f"{run.path} was trained with --{name.replace('_', '-')} "
                f"{before.get(name)}, not {config.get(name)}")
    return saved


@contextlib.contextmanager
def stop_on_signals(life: RunLifecycle):
    """Within: the first SIGINT or SIGTERM asks `life` to stop (`request_stop`); a second one
    raises at once (KeyboardInterrupt, or SystemExit(143) for SIGTERM), skipping the
    checkpoint but not the trainer's `close`. Only the main thread can install handlers;
    elsewhere this does nothing.

    Ray turns an exception raised by a signal handler inside its waits into SystemExit(1);
    whatever leaves the block after a second signal is made the one that signal raises."""
    if threading.current_thread() is threading.main_thread():
        aborted: list[int] = []
        previous = {s: signal.signal(s, _stop_handler(life, aborted)) for s in STOP_SIGNALS}
    else:
        aborted, previous = [], {}
    try:
        yield
    except BaseException:
        if aborted:
            raise _abort(aborted[0]) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_handler(life: RunLifecycle, aborted: list[int]):
    def stop(signum, frame):
        name = signal.Signals(signum).name
        if life.stop_signal is not None:
            aborted.append(signum)
            print(f"\ndistbelief: {name} again: stopping at once, without a checkpoint",
                  file=sys.stderr, flush=True)
            raise _abort(signum)
        life.stop_signal = signum
        life.request_stop()
        print(f"\ndistbelief: {name}: stopping after this step and checkpointing "
              f"({name} again to stop at once)", file=sys.stderr, flush=True)

    return stop


def _abort(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
