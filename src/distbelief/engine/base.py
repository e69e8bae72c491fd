"""The base of every trainer: the driver side of a training scheme, which the run lifecycle
drives and the CLI and the Python API call.

    trainer = DownpourTrainer(config, run_dir, resume=False, progress=True)  # nothing written
    summary = trainer.fit()           # start, train, evaluate, summary; close whatever happens
    trainer.request_stop()            # from a signal handler or another thread
    trainer.trained_model()           # the model at the parameters fit ended with

One trainer per scheme: `engine.trainer.Trainer` (one process), `pipeline.PipelineTrainer`
(one replica cut into partitions), `downpour.DownpourTrainer`, `sandblaster.SandblasterTrainer`,
`sync.SyncTrainer`. Each constructor runs the same preamble (`open_run`, which is
`RunLifecycle.prepare`), then builds what its scheme needs; `fit` hands the trainer to its
`RunLifecycle`, which calls `start`, `begin`s the run directory, calls `train`, evaluates
(`eval_model`) and writes the summary (`summary`), and calls `close` whatever happens.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from distbelief.data import DataBundle
from distbelief.engine.config import TrainConfig
from distbelief.engine.lifecycle import RunLifecycle
from distbelief.engine.losses import error_text


class BaseTrainer:
    """What every trainer offers (module doc). A subclass names its `mode`, its `state` (the
    checkpoint --resume continues from, checkpoints/STATE.pt) and the fields a resumed run
    must keep (`same`), calls `open_run` first in its constructor and implements `position`,
    `examples`, `train` and `eval_model`."""

    mode: ClassVar[str]
    state: ClassVar[str]
    same: ClassVar[tuple[str, ...]] = ()
    assembles: ClassVar[bool] = True  # a saved state written in pieces: assembled on resume

    life: RunLifecycle
    config: TrainConfig
    data: DataBundle
    device: torch.device

    def open_run(self, config: TrainConfig, run_dir: str | os.PathLike | None, *,
                 resume: bool, progress: bool, device: str = "cpu") -> dict | None:
        """The preamble every trainer shares (`RunLifecycle.prepare`): sets `life`, `config`
        (of this mode, resolved for its data), `data` (on `device`) and `device`; returns the
        saved state a resumed run continues from, or None. Writes nothing.

        Raises:
            ConfigError, DataError, CheckpointError: the run cannot start or continue."""
        self.life = RunLifecycle(run_dir, mode=self.mode, state=self.state, progress=progress)
        ready = self.life.prepare(config.replace(mode=self.mode), resume, self.same, device,
                                  self.assembles)
        self.config, self.data, self.device = ready.config, ready.data, ready.device
        return ready.saved

    # --- what the lifecycle calls ---------------------------------------------------------

    @property
    def position(self) -> int:
        """Iterations done."""
        raise NotImplementedError

    @property
    def examples(self) -> int:
        """Training examples processed."""
        raise NotImplementedError

    def start(self) -> None:
        """Acquire what training needs (Ray, actors). `close` runs even if this fails midway."""

    def train(self) -> None:
        """Train until `config.iterations`, convergence or a stop request
        (`RunLifecycle.stop_requested`: then checkpoint and raise `life.interrupted`),
        logging, evaluating and checkpointing on the way."""
        raise NotImplementedError

    def eval_model(self) -> torch.nn.Module:
        """The model at the current parameters, on the device of `data`."""
        raise NotImplementedError

    def progress_text(self) -> str:
        """What the evaluation line says of training, e.g. "train error 1.2%"."""
        return error_text(self.life.last_train, "train")

    def summary(self) -> dict:
        """The trainer's own summary entries (they may replace the common ones)."""
        return {}

    def close(self) -> None:
        """Release what `start` acquired, whatever happened."""

    # --- what callers use -------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from the current position to `config.iterations`, evaluate, write and return
        the summary (`RunLifecycle.fit`).

        Raises:
            TrainingInterrupted: a stop was requested (Ctrl-C, SIGTERM, `request_stop`); a
                checkpoint was written first.
            Diverged: the loss or the parameters became NaN or infinite.
            DistbeliefError: the scheme's own failures, one line each."""
        return self.life.fit(self)

    def request_stop(self) -> None:
        """Stop after the current unit of work and checkpoint (safe from a signal handler or
        another thread)."""
        self.life.request_stop()

    def trained_model(self) -> torch.nn.Module | None:
        """The model of the last evaluation: after `fit`, at the parameters it ended with."""
        return self.life.evaluated
