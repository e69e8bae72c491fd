"""Training an experiment's runs, resumably: each run has its own run directory under
OUT/runs; a finished one (summary.json) is skipped, an unfinished one resumed from its last
checkpoint, a new one started. Interrupt and rerun: only unfinished work is done.

With `parallel` K > 1 (several small nets side by side on one GPU) single-process runs train in
K child processes at once; a SIGINT or SIGTERM to the command is passed on to them, each
checkpoints, and the command stops. Distributed runs (their own Ray) always go one at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distbelief.engine.config import TrainConfig
from distbelief.engine.lifecycle import TrainingInterrupted
from distbelief.engine.rundir import RunDir
from distbelief.errors import DistbeliefError


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: its directory name and config."""

    name: str
    config: TrainConfig


def run_dir(runs: Path, spec: RunSpec) -> RunDir:
    return RunDir(runs / spec.name)


def is_done(runs: Path, spec: RunSpec) -> bool:
    return run_dir(runs, spec).summary_file.is_file()


def train_one(spec: RunSpec, path: Path, progress: bool = False) -> dict:
    """Train (or resume) one run in this process; its summary."""
    from distbelief.api import scheme_for

    started = RunDir(path).config_file.is_file()
    return scheme_for(spec.config, path, resume=started, progress=progress).fit()


def _child(spec: RunSpec, path: Path) -> None:
    """A child process's whole life: exit 0 trained, 128 + signal interrupted, 2 an error
    (said in one line on stderr)."""
    # A group of its own: Ctrl-C at a terminal reaches the parent only, which passes it on
    # once (a second signal would make the child stop without its checkpoint).
    os.setpgrp()
    try:
        train_one(spec, path)
    except TrainingInterrupted as e:
        sys.exit(128 + (e.signum or signal.SIGINT))
    except DistbeliefError as e:
        print(f"distbelief: {spec.name}: {e}", file=sys.stderr)
        sys.exit(2)


class Runner:
    """Trains the runs of `specs` not yet done into `runs`, `parallel` at a time; `say` gets
    one line per run started and finished.

    Raises:
        TrainingInterrupted: a signal stopped the runs (each checkpointed).
        DistbeliefError: a run failed (the others finished or checkpointed first)."""

    def __init__(self, runs: Path, parallel: int = 1, say: Callable[[str], None] = print,
                 progress: bool = False):
        self.runs, self.parallel, self.say, self.progress = runs, parallel, say, progress

    def run(self, specs: list[RunSpec]) -> None:
        todo = [s for s in specs if not is_done(self.runs, s)]
        done = len(specs) - len(todo)
        if done:
            self.say(f"{done} of {len(specs)} runs already done in {self.runs}")
        serial = [s for s in todo if self.parallel == 1 or s.config.distributed]
        children = [s for s in todo if s not in serial]
        if children:
            self._run_children(children)
        for spec in serial:
            self._run_here(spec)

    def _run_here(self, spec: RunSpec) -> None:
        self.say(f"training {spec.name}")
        start = time.perf_counter()
        summary = train_one(spec, self.runs / spec.name, self.progress)
        self.say(_finished(spec, summary, time.perf_counter() - start))

    def _run_children(self, specs: list[RunSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked torch or Ray state
        waiting, live, failed = list(specs), {}, []
        stop = _SignalRelay(live)
        with stop:
            while waiting or live:
                while waiting and len(live) < self.parallel and not stop.signum:
                    spec = waiting.pop(0)
                    proc = ctx.Process(target=_child, args=(spec, self.runs / spec.name),
                                       name=f"distbelief-{spec.name}")
                    proc.start()
                    live[spec] = (proc, time.perf_counter())
                    self.say(f"training {spec.name} (process {proc.pid})")
                self._reap(live, failed)
                if stop.signum and not live:
                    break
        if stop.signum:
            raise TrainingInterrupted("interrupted: the unfinished runs are checkpointed; run "
                                      "the same command again to continue", stop.signum)
        if failed:
            raise DistbeliefError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see the "
                                  f"lines above); rerun to retry them")

    def _reap(self, live: dict, failed: list) -> None:
        for spec, (proc, start) in list(live.items()):
            proc.join(timeout=0.2)
            if proc.exitcode is None:
                continue
            del live[spec]
            if proc.exitcode == 0:
                summary = run_dir(self.runs, spec).read_summary()
                self.say(_finished(spec, summary, time.perf_counter() - start))
            elif proc.exitcode < 128 or proc.exitcode - 128 not in (signal.SIGINT,
                                                                       signal.SIGTERM):
                failed.append(spec.name)


class _SignalRelay:
    """While active, SIGINT and SIGTERM are passed on to the live children as SIGTERM (each
    checkpoints and exits) and remembered; no new child starts after one."""

    def __init__(self, live: dict):
        self.live, self.signum, self.previous = live, None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
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


def _finished(spec: RunSpec, summary: dict, seconds: float) -> str:
    error = summary.get("test_error")
    what = f"test error {error:.2%}" if error is not None else "done"
    return f"finished {spec.name}: {what} ({seconds:.0f} s)"
