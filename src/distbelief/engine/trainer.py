"""Single-process training: `Trainer(config, run_dir).fit()`.

One loop, readable top to bottom: fetch batch i, set lr(i), forward, backward, SGD step. The
loop never synchronizes with the device except at log, evaluation and checkpoint points (and,
during an error-triggered warmup, once per step), so it runs as fast as a hand-written loop
(benchmarks/bench_trainer.py). The run directory, the cadence, signals, evaluation and the
summary are the shared `RunLifecycle`'s.

Resuming: a checkpoint holds the model, optimizer, schedule, RNG states and iteration. Batch i
and its augmentation are pure functions of (seed, i), so with `deterministic` on the CPU a
resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch

from distbelief.data import build_data
from distbelief.engine.base import BaseTrainer
from distbelief.engine.checkpoint import load_checkpoint, load_model_state
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import evaluate, recalibrate_for
from distbelief.engine.fast import CompiledStep, taken, tensor_lr
from distbelief.engine.lifecycle import Diverged, TrainingInterrupted
from distbelief.engine.losses import get_loss
from distbelief.engine.schedule import LRSchedule
from distbelief.engine.setup import build_model, place_model, resolve_device, set_determinism
from distbelief.engine.weights import load_init
from distbelief.errors import CheckpointError, ConfigError
from distbelief.optim import ADAGRAD_EPS

STATE = "last"  # the single-process state is the ordinary checkpoint, checkpoints/last.pt


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or Adagrad as configured; the same rules the parameter-server shards apply
    (distbelief.optim), so single-process and Downpour runs are comparable."""
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=config.lr, eps=ADAGRAD_EPS,
                                   weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _Window:
    """Sums over the steps since the last training record, kept on the device (reading them
    is the window's one synchronization), and the window's training time, pauses excluded."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss, self.wrong, self.seen = self.zero.clone(), self.zero.clone(), 0
        self.start, self.paused_s = time.perf_counter(), 0.0

    @torch.no_grad()
    def add(self, loss: torch.Tensor, wrong: torch.Tensor, images: int) -> torch.Tensor:
        self.loss += loss.detach().float() * images
        self.wrong += wrong
        self.seen += images
        return wrong

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints do not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.paused_s, 1e-9)


class Trainer(BaseTrainer):
    """Trains `config` in this process into `run_dir` (None: no files, for tests and
    benchmarks).

    `fit()` returns the summary dict (also written to summary.json). With `progress`, a
    progress bar (on a terminal) and one stderr line per evaluation. `request_stop()` (from a
    signal handler or another thread) makes the loop write a checkpoint after the current step
    and raise `TrainingInterrupted`. A model cut into partitions (--partitions) trains with
    `distributed.pipeline.PipelineTrainer`, which shares this loop.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoint; raised
            before anything in `run_dir` is written.
        Diverged: the loss became NaN or infinite (the last checkpoint stays as it was).
    """

    mode, state, same = "single", STATE, ("model", "variant", "data")

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False):
        self.check(config)
        saved = self.open_run(config, run_dir, resume=resume, progress=progress,
                              device=self.device_for(config))
        config = self.config
        set_determinism(config.deterministic, self.device)
        self.schedule = LRSchedule(config)
        self.loss = get_loss(config.loss)
        self.iteration = 0
        self.train_s = 0.0  # of the wall time, in training steps (no evaluation or checkpoints)
        self.build(saved)
        if saved:
            self.restore_position(saved)
        self.compiled = None
        if config.compile:
            tensor_lr(self.optimizer, self.device)
            self.compiled = CompiledStep(self.model, self.optimizer, self.loss, self.device,
                                         bf16=config.bf16, channels_last=config.channels_last)

    @staticmethod
    def check(config: TrainConfig) -> None:
        """Raise `ConfigError` for a config this trainer does not train."""
        if config.cluster.partitions > 1:
            raise ConfigError("--partitions trains with distributed.pipeline.PipelineTrainer "
                              "(distbelief.api.trainer_for picks the trainer of a config)")

    @staticmethod
    def device_for(config: TrainConfig) -> str:
        """Where the model trains (and the data lives)."""
        return config.device

    def build(self, saved: dict | None) -> None:
        """Set `model` and `optimizer`: new (seeded by the lifecycle, then --init-from's
        weights), or as `saved` holds them."""
        self.model = build_model(self.config, self.data, self.device)
        if not saved:  # a resumed run's weights come from its checkpoint
            load_init(self.model, self.config)
        self.optimizer = build_optimizer(self.config, self.model)
        if saved:
            self.restore_model(saved)

    def restore_model(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.life.run.checkpoint} does not fit this model "
                                  f"({str(e).splitlines()[0][:160]})") from None

    def restore_position(self, saved: dict) -> None:
        """The schedule, random generators, iteration and clock `saved` holds."""
        self.schedule.load_state_dict(saved["schedule"])
        _set_rng_state(saved["rng"], self.device)
        self.iteration, self.train_s = saved["iteration"], saved["train_s"]

    # --- what the lifecycle calls ------------------------------------------------------

    @property
    def position(self) -> int:
        return self.iteration

    @property
    def examples(self) -> int:
        return self.iteration * self.config.batch_size

    def train(self) -> None:
        self.train_until(self.config.iterations)

    def eval_model(self) -> torch.nn.Module:
        self.gather()
        return self.model

    def summary(self) -> dict:
        per_epoch = self.data.train.batches_per_epoch
        summary = {"epochs": round(self.iteration / per_epoch, 3),
                   "train_s": round(self.train_s, 3),
                   "images_per_s": round(self.examples / max(self.train_s, 1e-9), 1)}
        if self.compiled:  # after the warm-up steps, any compile or recording is a bug
            summary["compile_events"] = self.compiled.events.report()
        return summary

    def close(self) -> None:
        if self.compiled:
            self.compiled.close()

    def gather(self) -> None:
        """Bring the training state into `model` and `optimizer` before they are read (here
        they always are; a pipeline's parts hold theirs elsewhere)."""

    # --- running ----------------------------------------------------------------------------

    def evaluate(self, split: str = "test", views: str = "center", scales=()) -> dict:
        c = self.config
        return evaluate(self.model, self.data.splits[split].batches(views, scales),
                        channels_last=c.channels_last, bf16=c.bf16, loss=c.loss,
                        views=views == "tencrop")

    def checkpoint_state(self) -> dict:
        """The training state (the lifecycle adds the config, clock and last record)."""
        self.gather()
        return {**self.position_state(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def position_state(self) -> dict:
        """The training state but the model and optimizer: where the run is, its schedule,
        random generators and data."""
        epoch, batch = divmod(self.iteration, self.data.train.batches_per_epoch)
        return {"iteration": self.iteration,
                # Batch i is a function of (seed, i); the position is recorded for readers.
                "data_position": {"epoch": epoch, "batch_in_epoch": batch},
                "schedule": self.schedule.state_dict(), "rng": _rng_state(self.device),
                "data_stats": self.data.stats, "num_classes": self.data.num_classes,
                "in_chans": self.data.in_chans, "train_s": self.train_s}

    def save(self) -> None:
        # --bn-recalibrate: the checkpoint's model has the statistics an evaluation would use
        # (training in train mode never reads them, so the weights' path is unchanged).
        if self.config.bn_recalibrate:
            self.gather()
            recalibrate_for(self.model, self.config, self.data, self.iteration)
        self.life.save_state(self.config, self.checkpoint_state())

    def train_until(self, until: int) -> None:
        """Run training steps up to iteration `until`, logging every `log_every`, evaluating
        every `eval_every` (and `eval_interval_s`) and checkpointing every `checkpoint_every`
        iterations and at `until`."""
        life = self.life
        life.begin(self)  # once: `fit` has begun the run directory already
        self.model.train()
        bar = _progress_bar(until, self.iteration, life.progress)
        batches = self.data.train.batches(self.iteration)
        window = _Window(self.device)
        cadence = life.cadences(self.config, self.iteration)
        life.clock.start()
        try:
            while self.iteration < until:
                lr = self._step(*next(batches), window)
                bar.update(1)
                it, stop = self.iteration, life.stop_requested  # a signal may set it any time
                checkpoint_now = cadence.checkpoint.due(it) or it == until or stop
                if cadence.log.due(it) or checkpoint_now:
                    self._log_window(window, lr, checkpoint_now, bar)
                    cadence.log.done(it)
                if cadence.eval.due(it):
                    with window.paused():
                        life.evaluate(self)
                    cadence.eval.done(it)
                if checkpoint_now:
                    with window.paused():
                        self.save()
                    cadence.checkpoint.done(it)
                if stop and it != until:
                    raise life.interrupted(it)
        finally:
            life.clock.stop()
            bar.close()

    def _step(self, x: torch.Tensor, y: torch.Tensor, window: _Window) -> float:
        lr = self.schedule.lr_at(self.iteration)
        loss, wrong = self.compute(x, y, lr)
        wrong = window.add(loss, wrong, len(y))
        if self.schedule.needs_error:
            self.schedule.observe(self.iteration, float(wrong) / len(y))
        self.iteration += 1
        return lr

    def compute(self, x: torch.Tensor, y: torch.Tensor,
                lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on batch (x, y) at `lr`: (the batch's mean loss, misclassified
        examples), as tensors not yet synchronized with the device."""
        if self.compiled:
            return self._compiled_step(x, y, lr)
        c, opt = self.config, self.optimizer
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            logits = self.model(x)
            loss = self.loss(logits, y)
        wrong = self.loss.wrong(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        return loss, wrong

    def _compiled_step(self, x: torch.Tensor, y: torch.Tensor,
                       lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss, wrong = self.compiled.forward_loss(x, y)
        # Copied before the update: a CUDA graph's next replay overwrites its outputs.
        values = taken(loss, wrong)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.compiled.update(lr)
        return values

    def _log_window(self, window: _Window, lr: float, checkpoint_now: bool, bar) -> None:
        """Log the window's training record (its mean loss and error, images/s).

        Raises:
            Diverged: the loss, or before a checkpoint any parameter, is not finite: never log
                on with, nor replace a good checkpoint by, a diverged model."""
        it = self.iteration
        loss = float(window.loss) / window.seen  # waits for the device
        if not (math.isfinite(loss) and (not checkpoint_now or self._params_finite())):
            raise Diverged(f"training diverged (loss {loss}) by iteration {it}; lower --lr "
                           f"(the last checkpoint is kept)")
        seconds = window.seconds()
        self.train_s += seconds
        record = {"kind": "train", "iteration": it,
                  "epoch": round(it / self.data.train.batches_per_epoch, 4), "loss": loss,
                  "error": float(window.wrong) / window.seen if self.loss.classifies else None,
                  "lr": lr,
                  "images_per_s": round(window.seen / seconds, 1),
                  "wall_s": round(self.life.wall_s, 3)}
        self.life.log_train({**record, **self.record_extras()})
        bar.set_postfix({"loss": f"{loss:.3f}", "img/s": f"{record['images_per_s']:.0f}"},
                        refresh=False)
        window.reset()

    def record_extras(self) -> dict:
        """Entries a training record adds to the common ones (none here)."""
        return {}

    def _params_finite(self) -> bool:
        self.gather()
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())


def _progress_bar(total: int, initial: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="it", file=sys.stderr,
                disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True, leave=False)


def load_for_eval(checkpoint: str | os.PathLike, overrides: dict | None = None):
    """(model, data, config) from a checkpoint, with data settings in `overrides` applied
    (another --data-dir, batch size, device ...). The model and normalization are the
    checkpoint's."""
    ckpt = load_checkpoint(checkpoint)
    try:
        config = TrainConfig.from_dict(ckpt["config"]).replace(**(overrides or {}))
        device = resolve_device(config.device)
        data = build_data(config, device, stats=ckpt["data_stats"])
        if (data.num_classes, data.in_chans) != (ckpt["num_classes"], ckpt["in_chans"]):
            raise CheckpointError(
                f"{checkpoint} was trained on {ckpt['num_classes']} classes of "
                f"{ckpt['in_chans']}-channel images; this data has {data.num_classes} of "
                f"{data.in_chans}")
    except KeyError as e:
        raise CheckpointError(f"{checkpoint} lacks {e}; not a training checkpoint") from None
    model = load_model_state(build_model(config, data), ckpt, checkpoint, config.model)
    return place_model(model, config, device), data, config


__all__ = ["Trainer", "TrainingInterrupted", "Diverged", "load_for_eval", "build_optimizer"]
