"""Training an experiment's runs, resumably: each run has its own run directory under
OUT/runs; a finished one (summary.json) is skipped, an unfinished one resumed from its last
checkpoint, a new one started. Interrupt and rerun: only unfinished work is done. A run
directory trained with other settings (another seed, schedule, ...) is refused, never mixed.

With `parallel` K > 1 (several small nets side by side on one GPU) single-process runs train
in K child processes at once, each in a process group of its own; on a GPU under a CUDA MPS
daemon (`paper.mps`), so that their kernels run side by side instead of time-slicing it. A
SIGINT or SIGTERM to the command is passed on to them as SIGTERM: the first makes each
checkpoint and stop, a second stops them at once, as for `distbelief train`. A child whose
parent dies stops the same way. Distributed runs (their own Ray) always go one at a time, in
this process. Linux semantics (signal masks, process groups).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distbelief.engine.config import TrainConfig
from distbelief.engine.lifecycle import TrainingInterrupted
from distbelief.engine.rundir import RunDir
from distbelief.errors import ConfigError, DistbeliefError
from distbelief.paper.mps import Mps

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# What makes two runs the same experiment; device, compile and the data folder's path may
# differ between a run and its resume.
SAME = ("model", "data", "mode", "seed", "bf16", "iterations", "batch_size", "lr", "momentum",
        "weight_decay", "milestones", "optimizer", "augment", "replicas", "ps_shards")


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: its directory name and config."""

    name: str
    config: TrainConfig


def run_dir(runs: Path, spec: RunSpec) -> RunDir:
    return RunDir(runs / spec.name)


def is_done(runs: Path, spec: RunSpec) -> bool:
    return run_dir(runs, spec).summary_file.is_file()


def check_same(runs: Path, spec: RunSpec) -> None:
    """Raise `ConfigError` if the run directory of `spec` holds a run with other settings."""
    run = run_dir(runs, spec)
    if not run.config_file.is_file():
        return
    saved = run.read_config()
    for name in SAME:
        if saved.get(name) != spec.config.get(name):
            raise ConfigError(f"{run.path} was trained with {name} {saved.get(name)!r}, not "
                              f"{spec.config.get(name)!r}; use another --out")


def train_one(spec: RunSpec, path: Path, progress: bool = False) -> dict:
    """Train (or resume) one run in this process; its summary."""
    from distbelief.api import trainer_for

    started = RunDir(path).config_file.is_file()
    return trainer_for(spec.config, path, resume=started, progress=progress).fit()


def _child(spec: RunSpec, path: Path, parent: int) -> None:
    """A child process's whole life: exit 0 trained, 128 + signal interrupted, 2 an error
    (said in one line on stderr). It starts with SIGINT ignored (set by the parent): a Ctrl-C
    that reaches it before it has a group of its own is the parent's to pass on."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_stop_with_parent, args=(parent,), daemon=True).start()
    try:
        train_one(spec, path)
    except TrainingInterrupted as e:
        sys.exit(128 + (e.signum or signal.SIGINT))
    except DistbeliefError as e:
        print(f"distbelief: {spec.name}: {e}", file=sys.stderr)
        sys.exit(2)


def _stop_with_parent(parent: int) -> None:
    """SIGTERM to this process (checkpoint and stop) once the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


class Runner:
    """Trains the runs of `specs` not yet done into `runs`, `parallel` at a time; `say` gets
    one line per run started and finished.

    Raises:
        ConfigError: a run directory holds a run with other settings (before anything runs).
        TrainingInterrupted: a signal stopped the runs (each checkpointed).
        DistbeliefError: a run failed (the others finished or checkpointed first)."""

    def __init__(self, runs: Path, parallel: int = 1, say: Callable[[str], None] = print,
                 progress: bool = False):
        self.runs, self.parallel, self.say, self.progress = runs, parallel, say, progress

    def run(self, specs: list[RunSpec]) -> None:
        for spec in specs:
            check_same(self.runs, spec)
        todo = [s for s in specs if not is_done(self.runs, s)]
        done = len(specs) - len(todo)
        if done:
            self.say(f"{done} of {len(specs)} runs already done in {self.runs}")
        serial = [s for s in todo if self.parallel == 1 or s.config.distributed]
        children = [s for s in todo if s not in serial]
        if children:
            self._run_children(children)
        with _SignalRelay({}) as stop:  # a signal between two runs stops before the next
            for spec in serial:
                if stop.signum:
                    raise _interrupted(stop.signum)
                self._run_here(spec)

    def _run_here(self, spec: RunSpec) -> None:
        self.say(f"training {spec.name}")
        start = time.perf_counter()
        summary = train_one(spec, self.runs / spec.name, self.progress)
        self.say(_finished(spec, summary, time.perf_counter() - start))

    def _run_children(self, specs: list[RunSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked torch or Ray state
        waiting, live, failed = list(specs), {}, []
        mps = self._share_gpu(specs)
        try:
            with _SignalRelay(live) as stop:
                while waiting or live:
                    while waiting and len(live) < self.parallel and not stop.signum:
                        self._start(ctx, waiting.pop(0), live)
                    self._reap(live, failed, stop)
        finally:
            mps.stop()
        if stop.signum:
            raise _interrupted(stop.signum)
        if failed:
            raise DistbeliefError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see the "
                                  f"lines above); rerun to retry them")

    def _share_gpu(self, specs: list[RunSpec]) -> Mps:
        """CUDA MPS for children that train on a GPU, so that they run side by side instead of
        time-slicing it (a no-op `Mps` otherwise)."""
        import torch

        on_gpu = torch.cuda.is_available() and any(
            s.config.device in ("auto", "cuda") or s.config.device.startswith("cuda:")
            for s in specs)
        if not on_gpu:
            return Mps("")
        mps = Mps.start()
        self.say(mps.note)
        return mps

    def _start(self, ctx, spec: RunSpec, live: dict) -> None:
        """Start a child for `spec` and record it in `live` with the stop signals held back
        meanwhile (delivered, and passed on to it, right after), and SIGINT ignored for the
        child to inherit."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = ctx.Process(target=_child, args=(spec, self.runs / spec.name, os.getpid()),
                               name=f"distbelief-{spec.name}")
            proc.start()
            live[spec] = (proc, time.perf_counter())
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.say(f"training {spec.name} (process {proc.pid})")

    def _reap(self, live: dict, failed: list, stop: "_SignalRelay") -> None:
        for spec, (proc, start) in list(live.items()):
            proc.join(timeout=0.2)
            if proc.exitcode is None:
                continue
            del live[spec]
            if proc.exitcode == 0:
                summary = run_dir(self.runs, spec).read_summary()
                self.say(_finished(spec, summary, time.perf_counter() - start))
            elif not stop.signum:  # stopped by something else than us: not finished
                failed.append(spec.name)


class _SignalRelay:
    """While active, SIGINT and SIGTERM are remembered and passed on to the live children
    (`live`: spec -> (process, start time)) as SIGTERM; no new child starts after one."""

    def __init__(self, live: dict):
        self.live, self.signum, self.previous = live, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._relay)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _relay(self, signum, frame) -> None:
        self.signum = self.signum or signum
        for proc, _ in self.live.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the child's lifecycle checkpoints and stops


def _interrupted(signum: int) -> TrainingInterrupted:
    return TrainingInterrupted("interrupted: the unfinished runs are checkpointed; run the "
                               "same command again to continue", signum)


def _finished(spec: RunSpec, summary: dict, seconds: float) -> str:
    error = summary.get("test_error")
    what = f"test error {error:.2%}" if error is not None else "done"
    return f"finished {spec.name}: {what} ({seconds:.0f} s)"
