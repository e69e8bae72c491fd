"""One rank of synchronous data parallelism (`--mode sync`). No Ray here: the process group is
initialized by the caller (Ray Train in `sync.actors`, or a test), the hub is any object with
`put(event)` and `stop_requested()` (`sync.hub.SyncHub`, or its Ray client), and `report` is
how a checkpoint is kept for restarts (Ray Train's `ray.train.report` in `sync.actors`).

Batch semantics: --batch-size is per replica. Step i's global batch is the single-process
trainer's batch i at N x --batch-size images (same order, same augmentation); rank r loads and
augments rows [r*B, (r+1)*B) of it and nothing else (`build_data(rows=...)`: 1/N of the input
work), and DistributedDataParallel averages the gradients over the ranks before every rank
applies the same update. So N replicas of batch B train exactly as one process with batch N*B
(BatchNorm aside: each replica normalizes its own rows), --iterations counts these synchronous
steps, and the lr schedule is the recipe's, unscaled.

Checkpoints: at each checkpoint step every rank calls `report(iteration, state, records)`,
rank 0 with its state and the run's training records so far (a few hundred bytes each: a
driver that was killed before it heard of a checkpoint writes the ones it missed from it), the
others with None (Ray Train's report is collective); a worker group that Ray Train restarts, or
a run resumed later, continues from the last one (`load`).

Every rank takes the same decisions at the same step: rank 0 decides when to log, evaluate,
checkpoint and stop, and broadcasts that with one small collective per step over a gloo group
of CPU tensors (`control`), so that a GPU is not synchronized with its host every step.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from distbelief.data import build_data
from distbelief.engine.lifecycle import Cadences
from distbelief.engine.losses import get_loss
from distbelief.engine.schedule import LRSchedule
from distbelief.engine.setup import build_model, set_determinism
from distbelief.engine.trainer import build_optimizer
from distbelief.engine.weights import load_init

LOG, EVALUATE, CHECKPOINT, STOP = range(4)  # the flags rank 0 broadcasts after every step


class SyncWorker:
    """Rank `rank` of `world`, computing on `device`. `stats`: the driver's data statistics;
    `hub`: rank 0's channel to the driver (None on the other ranks); `wrap`: turns the model
    into the module that all-reduces gradients (DistributedDataParallel), None for one rank;
    `control`: the gloo process group for rank 0's decisions (None: the default group);
    `report(iteration, state, records)`: called by every rank at each checkpoint (None: not
    kept). `load(state, records)` continues from a checkpointed state and the records up to
    it; `run()` trains to config.iterations, a stop request or divergence."""

    def __init__(self, config, rank: int, world: int, device: torch.device, stats: dict,
                 hub=None, wrap=None, control=None, report=None):
        self.config, self.rank, self.world, self.device, self.hub = (
            config, rank, world, device, hub)
        self.control, self.report = control, report
        set_determinism(config.deterministic, device)
        torch.manual_seed(config.seed)  # the single-process trainer's initial model
        b = config.batch_size
        self.data = build_data(config.replace(batch_size=b * world), device, stats=stats,
                               rows=(rank * b, (rank + 1) * b))
        self.model = load_init(build_model(config, self.data, device), config)
        self.forward = wrap(self.model) if wrap is not None else self.model
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = LRSchedule(config)
        self.loss = get_loss(config.loss)
        self.iteration, self.train_s = 0, 0.0
        self.records: list[dict] = []  # the run's training records so far

    def load(self, state: dict, records: list[dict] = ()) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.iteration, self.train_s = state["iteration"], state["train_s"]
        self.records = list(records)

    def state(self) -> dict:
        """What a checkpoint holds of the training (on the CPU, copied)."""
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return {"iteration": self.iteration, "model": cpu,
                "optimizer": _to_cpu(self.optimizer.state_dict()),
                "schedule": self.schedule.state_dict(), "train_s": self.train_s}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One synchronous step on this rank's rows of the global batch (x, y); returns [loss
        summed over the rows, wrong predictions] on the device (not synchronized)."""
        c = self.config
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self.schedule.lr_at(self.iteration)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            logits = self.forward(x)
            loss = self.loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DistributedDataParallel averages the gradients over the ranks here
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        wrong = self.loss.wrong(logits, y)
        if self.schedule.needs_error:  # the error-triggered warmup watches the global batch
            wrong_all = float(self._sum(wrong.float().reshape(1)))
            self.schedule.observe(self.iteration, wrong_all / (len(y) * self.world))
        self.iteration += 1
        return torch.stack([loss.detach().float() * len(y), wrong.float()])

    def run(self) -> None:
        """Train to config.iterations; stop early (after a checkpoint) when the hub asks, or
        (all ranks alike) when the loss is no longer finite."""
        until = self.config.iterations
        cadence = Cadences(self.config, self.iteration)
        batches = self.data.train.batches(self.iteration)
        window = torch.zeros(2, device=self.device)
        steps, start = 0, time.perf_counter()
        while self.iteration < until:
            window += self.step(*next(batches))
            steps += 1
            flags = self._flags(cadence, until)
            if not (flags[LOG] or flags[EVALUATE] or flags[CHECKPOINT]):
                continue
            seconds = time.perf_counter() - start
            self.train_s += seconds
            loss_sum, wrong = (float(t) for t in self._sum(window))
            images = steps * self.config.batch_size * self.world
            if not math.isfinite(loss_sum):
                self._put({"kind": "diverged", "iteration": self.iteration,
                           "loss": loss_sum / images})
                return
            if flags[LOG] or flags[CHECKPOINT]:
                record = self._record(loss_sum, wrong, images, seconds)
                if self.rank == 0:
                    self.records.append(record)
                self._put({"kind": "train", "record": record})
                cadence.log.done(self.iteration)
            if flags[EVALUATE] or flags[CHECKPOINT]:
                self._hand_over(flags, cadence)
            if flags[STOP]:
                return
            window.zero_()
            steps, start = 0, time.perf_counter()

    def _hand_over(self, flags: torch.Tensor, cadence: Cadences) -> None:
        """The state: kept for restarts (`report`, on every rank) at a checkpoint, and handed
        to the driver to evaluate and/or write into the run directory."""
        state = self.state() if self.rank == 0 else None
        if flags[CHECKPOINT] and self.report is not None:
            self.report(self.iteration, state, self.records)
        self._put({"kind": "state", "iteration": self.iteration, "state": state,
                   "evaluate": bool(flags[EVALUATE]), "checkpoint": bool(flags[CHECKPOINT])})
        if flags[EVALUATE]:
            cadence.eval.done(self.iteration)
        if flags[CHECKPOINT]:
            cadence.checkpoint.done(self.iteration)

    def _flags(self, cadence: Cadences, until: int) -> torch.Tensor:
        """Rank 0's decisions for the step just done, the same on every rank."""
        flags = torch.zeros(4, dtype=torch.int64)
        if self.rank == 0:
            it = self.iteration
            stop = bool(self.hub.stop_requested()) and it != until
            checkpoint = cadence.checkpoint.due(it) or it == until or stop
            flags[:] = torch.tensor([cadence.log.due(it), cadence.eval.due(it), checkpoint, stop])
        if self.world > 1:
            dist.broadcast(flags, 0, group=self.control)
        return flags

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (a copy)."""
        values = values.clone()
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def _record(self, loss_sum: float, wrong: float, images: int, seconds: float) -> dict:
        return {"kind": "train", "iteration": self.iteration,
                "epoch": round(self.iteration / self.data.train.batches_per_epoch, 4),
                "loss": loss_sum / images,
                "error": wrong / images if self.loss.classifies else None,
                "lr": self.schedule.lr_at(self.iteration - 1),
                "images_per_s": round(images / max(seconds, 1e-9), 1)}

    def _put(self, event: dict) -> None:
        if self.rank == 0:
            self.hub.put(event)


def _to_cpu(value):
    """An optimizer state dict with its tensors copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
