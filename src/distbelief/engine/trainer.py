"""Single-process training: `Trainer(config, run_dir).fit()`.

One loop, readable top to bottom: fetch batch i, set lr(i), forward, backward, SGD step. The
loop never synchronizes with the device except at log, evaluation and checkpoint points (and,
during an error-triggered warmup, once per step), so it runs as fast as a hand-written loop
(benchmarks/bench_trainer.py).

Resuming: a checkpoint holds the model, optimizer, schedule, RNG states and iteration. Batch i
and its augmentation are pure functions of (seed, i), so with `deterministic` on the CPU a
resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from distbelief.data import DataBundle, build_data
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import evaluate
from distbelief.engine.rundir import RunDir
from distbelief.engine.schedule import LRSchedule
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError
from distbelief.models import create_model, model_info
from distbelief.optim import ADAGRAD_EPS


class TrainingInterrupted(DistbeliefError):
    """Training stopped on request (Ctrl-C) after writing a checkpoint."""


class Diverged(DistbeliefError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels when asked (repeatable on CPU; on CUDA as far as cuDNN allows),
    otherwise cuDNN autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def build_model(config: TrainConfig, data: DataBundle,
                device: torch.device | None = None) -> torch.nn.Module:
    """`config.model` for `data`'s classes and channels; with `device`, moved there and in the
    configured memory format (channels-last or not)."""
    options = {"shortcut": config.shortcut} if config.shortcut else {}
    if config.hidden is not None:
        options["hidden"] = config.hidden
    if model_info(config.model).sized:  # dense models flatten images of the data's size
        options["input_size"] = tuple(data.stats["mean"].shape[1:])
    model = create_model(config.model, num_classes=data.num_classes, in_chans=data.in_chans,
                         **options)
    if device is None:
        return model
    return place_model(model, config, device)


def place_model(model: torch.nn.Module, config: TrainConfig,
                device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


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


class Trainer:
    """Trains `config` into `run_dir` (None: no files, for tests and benchmarks).

    `fit()` returns the summary dict (also written to summary.json). With `progress`, a
    progress bar (on a terminal) and one stderr line per evaluation. `request_stop()` (from a
    signal handler) makes the loop write a checkpoint after the current step and raise
    `TrainingInterrupted`.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoint; raised
            before anything in `run_dir` is written.
        Diverged: the loss became NaN or infinite (the last checkpoint stays as it was).
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False):
        self.run = RunDir(run_dir) if run_dir is not None else None
        checkpoint = None
        restart = False  # a run that stopped before its first checkpoint starts over
        if resume:
            if self.run is None:
                raise ConfigError("--resume needs --out RUN_DIR")
            restart = self.run.config_file.is_file() and not self.run.checkpoint.exists()
        if resume and not restart:
            checkpoint = load_checkpoint(self.run.checkpoint)
            mode = checkpoint.get("mode", "single")
            if mode != "single":
                raise CheckpointError(f"{self.run.path} holds a {mode} run; resume it with "
                                      f"--mode {mode}")
            saved = checkpoint["config"]["model"]
            if saved != config.model:
                raise CheckpointError(f"{self.run.checkpoint} holds a {saved}, not a {config.model}")
        elif not resume and self.run is not None:
            self.run.refuse_if_occupied()  # before loading data: fail fast

        self.device = resolve_device(config.device)
        set_determinism(config.deterministic, self.device)
        torch.manual_seed(config.seed)
        self.data = build_data(config, self.device,
                               stats=checkpoint["data_stats"] if checkpoint else None)
        self.config = config = config.resolve_epochs(self.data.train_size)
        self.model = build_model(config, self.data, self.device)
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = LRSchedule(config)
        self.progress = progress
        self.iteration = 0
        self.wall_s = 0.0  # time spent in the training loop, over all resumes
        self.train_s = 0.0  # of which in training steps (no evaluation or checkpointing)
        self.last_train: dict = {}
        self._last_eval: dict | None = None
        self._stop = False
        if checkpoint:
            self._restore(checkpoint)
        elif restart:
            self.run.truncate_metrics(0)
            self.run.log({"kind": "resume", "iteration": 0})
        if resume:
            self.run.update_config(config)
        elif self.run is not None:
            self.run.create(config, str(self.device))

    def _restore(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.run.checkpoint} does not fit this model "
                                  f"({str(e).splitlines()[0][:160]})") from None
        self.schedule.load_state_dict(ckpt["schedule"])
        _set_rng_state(ckpt["rng"], self.device)
        self.iteration = ckpt["iteration"]
        self.wall_s, self.train_s = ckpt["wall_s"], ckpt["train_s"]
        self.last_train = ckpt.get("last_train", {})
        self.run.truncate_metrics(self.iteration)
        self.run.log({"kind": "resume", "iteration": self.iteration})

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def request_stop(self) -> None:
        self._stop = True

    def checkpoint_state(self) -> dict:
        epoch, batch = divmod(self.iteration, self.data.train.batches_per_epoch)
        return {"config": self.config.to_dict(), "iteration": self.iteration,
                # Batch i is a function of (seed, i); the position is recorded for readers.
                "data_position": {"epoch": epoch, "batch_in_epoch": batch},
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "rng": _rng_state(self.device),
                "data_stats": self.data.stats, "num_classes": self.data.num_classes,
                "in_chans": self.data.in_chans, "wall_s": self.wall_s, "train_s": self.train_s,
                "last_train": self.last_train}

    def save(self) -> None:
        if self.run is not None:
            save_checkpoint(self.run.checkpoint, self.checkpoint_state())

    def evaluate(self, split: str = "test", views: str = "center", scales=()) -> dict:
        c = self.config
        return evaluate(self.model, self.data.splits[split].batches(views, scales),
                        channels_last=c.channels_last, bf16=c.bf16)

    def _log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(record)

    def _evaluate_all(self) -> dict:
        """Evaluate every split (val, test), log the records and keep them as `_last_eval`."""
        from tqdm import tqdm

        results = {}
        for split in self.data.splits:
            r = {"kind": "eval", "split": split, "iteration": self.iteration,
                 "wall_s": round(self.wall_s, 3), **self.evaluate(split)}
            results[split] = r
            self._log(r)
        if self.progress:
            tqdm.write(f"iteration {self.iteration}/{self.config.iterations}: train error "
                       f"{self.last_train.get('error', float('nan')):.2%}, "
                       f"test error {results['test']['error']:.2%}", file=sys.stderr)
        self._last_eval = results
        return results

    def fit(self) -> dict:
        """Train from the current iteration to `config.iterations`, evaluate, return the
        summary."""
        self.train_until(self.config.iterations)
        results = self._last_eval
        if results is None or results["test"]["iteration"] != self.iteration:
            results = self._evaluate_all()
        return self._summarize(results)

    def train_until(self, until: int) -> None:
        """Run training steps up to iteration `until`, logging, evaluating every `eval_every`
        and checkpointing every `checkpoint_every` iterations and at `until`."""
        from tqdm import tqdm

        c, model, opt = self.config, self.model, self.optimizer
        model.train()
        per_epoch = self.data.train.batches_per_epoch
        bar = tqdm(total=until, initial=self.iteration, unit="it", file=sys.stderr,
                   disable=not (self.progress and sys.stderr.isatty()), dynamic_ncols=True,
                   leave=False)
        batches = self.data.train.batches(self.iteration)
        zero = torch.zeros((), device=self.device)
        loss_sum, wrong_sum, seen = zero.clone(), zero.clone(), 0
        clock = time.perf_counter
        loop_start, wall_before = clock(), self.wall_s
        window_start, paused = clock(), 0.0  # paused: evaluation and checkpoint time

        def elapsed() -> float:
            return wall_before + clock() - loop_start

        try:
            while self.iteration < until:
                x, y = next(batches)
                if c.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = self.schedule.lr_at(self.iteration)
                for group in opt.param_groups:
                    group["lr"] = lr
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    wrong = (logits.argmax(1) != y).sum()
                    loss_sum += loss.detach().float() * len(y)
                    wrong_sum += wrong
                seen += len(y)
                if self.schedule.needs_error:
                    self.schedule.observe(self.iteration, float(wrong) / len(y))
                self.iteration += 1
                bar.update(1)

                it = self.iteration
                done = it == until
                stop = self._stop  # read once: a signal may set it at any moment
                checkpoint_now = (c.checkpoint_every and it % c.checkpoint_every == 0) or done \
                    or stop
                if it % c.log_every == 0 or checkpoint_now:
                    train_loss = float(loss_sum) / seen  # waits for the device: the window's one sync
                    if not (math.isfinite(train_loss) and (not checkpoint_now or self._params_finite())):
                        # Never log on, nor replace a good checkpoint with, a diverged model.
                        raise Diverged(f"training diverged (loss {train_loss}) by iteration {it}; "
                                       f"lower --lr (the last checkpoint is kept)")
                    now = clock()
                    window_s = max(now - window_start - paused, 1e-9)
                    self.train_s += window_s
                    self.wall_s = elapsed()
                    self.last_train = {
                        "kind": "train", "iteration": it, "epoch": round(it / per_epoch, 4),
                        "loss": train_loss, "error": float(wrong_sum) / seen, "lr": lr,
                        "images_per_s": round(seen / window_s, 1), "wall_s": round(self.wall_s, 3)}
                    self._log(self.last_train)
                    bar.set_postfix({"loss": f"{train_loss:.3f}",
                                     "error": f"{self.last_train['error']:.2%}",
                                     "img/s": f"{self.last_train['images_per_s']:.0f}"},
                                    refresh=False)
                    loss_sum, wrong_sum, seen = zero.clone(), zero.clone(), 0
                    window_start, paused = now, 0.0
                if c.eval_every and it % c.eval_every == 0:
                    pause_start = clock()
                    self.wall_s = elapsed()
                    self._evaluate_all()
                    paused += clock() - pause_start
                if checkpoint_now:
                    pause_start = clock()
                    self.wall_s = elapsed()
                    self.save()
                    paused += clock() - pause_start
                if stop and not done:
                    raise TrainingInterrupted(
                        f"stopped at iteration {it}; checkpoint saved, continue with --resume")
        finally:
            self.wall_s = elapsed()
            bar.close()

    def _summarize(self, results: dict) -> dict:
        c, test = self.config, results["test"]
        images = self.iteration * c.batch_size
        summary = {
            "recipe": c.recipe, "model": c.model, "data": c.data, "device": str(self.device),
            "iterations": self.iteration, "epochs": round(self.iteration / self.data.train.batches_per_epoch, 3),
            "test_error": test["error"], "test_accuracy": 1 - test["error"],
            "test_top5_error": test["top5_error"], "test_loss": test["loss"],
            "train_error": self.last_train.get("error"), "train_loss": self.last_train.get("loss"),
            "wall_s": round(self.wall_s, 3), "train_s": round(self.train_s, 3),
            "images_per_s": round(images / max(self.train_s, 1e-9), 1),
        }
        if "val" in results:
            summary["val_error"] = results["val"]["error"]
        if self.run is not None:
            self.run.write_summary(summary)
        return summary


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
        model = build_model(config, data)
        model.load_state_dict(ckpt["model"])
    except KeyError as e:
        raise CheckpointError(f"{checkpoint} lacks {e}; not a training checkpoint") from None
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit {config.model} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return place_model(model, config, device), data, config


__all__ = ["Trainer", "TrainingInterrupted", "Diverged", "load_for_eval", "resolve_device",
           "build_model", "build_optimizer"]
