"""Downpour with model parallelism (Dean et al., 2012, Fig. 2): a replica whose model is cut
into partitions, each fetching and pushing only its own parameters from the shards that hold
them. No Ray here.

    ServerStage         a pipeline `Stage` whose parameters come from its own shards and
                        whose gradients go back to them (an `Exchange` over its part alone)
    PartitionedReplica  the replica's head: its slice of the data and the pipeline schedule
                        (`pipeline.Pipeline`); it holds no parameters

The shards are laid out part after part (`layout.server_layout`); `actors` runs each stage and
each head in its own process.

A step of a partitioned replica: every stage `begin`s (installs the parameters its last fetch
brought, or issues the fetch that is due), the forward and backward passes run through the
stages (`Pipeline.submit_passes`), then every stage `finish`es: it adds its gradient to the
push it is accumulating and pushes when --n-push steps have passed, without waiting. So each
partition talks to the server on its own, at its own pace, and the server's shards see the
pushes of P x R partitions; staleness is measured per shard, hence per partition.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from distbelief.data import BatchCursor, build_data
from distbelief.distributed.downpour.replica import (REAL_CLOCK, Exchange, RealClock,
                                                     chunk_metrics, straggler_delay)
from distbelief.distributed.flat import FlatModel
from distbelief.distributed.pipeline import Pipeline, Stage
from distbelief.distributed.pipeline.stage import empty_copy

STAGE_METRICS = ("compute_s", "fetch_wait_s", "push_wait_s", "bytes_out", "fetches", "pushes",
                 "rejected")


class ServerStage(Stage):
    """Stage `index` of `count` of replica `replica`, whose part's values live on the shards
    `client` reaches (its slice of the server vector, `BlockFlat` order). A module built on the
    meta device is allocated here (its values come with the first fetch). Under
    --partition-dtype bfloat16 its weights (BatchNorm's statistics too), activations and
    gradients are bfloat16: fetches are rounded once into them, and pushes arrive on the
    shards as their exact float32 values. `clock` times its exchange's waits (`RealClock`)."""

    def __init__(self, index: int, count: int, module: torch.nn.Module, loss, config, client,
                 replica: int, device: torch.device = torch.device("cpu"),
                 clock: RealClock = REAL_CLOCK):
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module = module.to_empty(device=device)
        dtype = torch.bfloat16 if config.cluster.partition_dtype == "bfloat16" else None
        super().__init__(index, count, module, loss, None, device=device,
                         channels_last=config.channels_last, bf16=config.bf16,
                         recompute=config.cluster.recompute, dtype=dtype)
        self.flat = FlatModel(self.module)
        has_values = self.flat.n_params + self.flat.n_buffers > 0
        self.exchange = Exchange(replica, config, client, self.flat, clock) if has_values \
            else None
        self.metrics = dict.fromkeys(STAGE_METRICS, 0)
        self.evaluating: torch.nn.Module | None = None  # `begin_eval`'s copy
        self.n_push = config.downpour.n_push
        # The parameters' gradients are views of one flat vector, in the server's (logical)
        # order, into which backward accumulates in place: the push sends it as it is, no
        # flattening copy (at a billion parameters, each copy is gigabytes). A channels-last
        # weight then has a gradient of another layout; accumulation in place is still exact.
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient")
        self.gradient = torch.zeros(self.flat.n_params, device=device,
                                    dtype=dtype or torch.float32)
        with torch.no_grad():
            for p, view in zip(self.flat.params, self.gradient.split(
                    [p.numel() for p in self.flat.params])):
                p.grad = view.view(p.shape)

    def zero_grad(self) -> None:
        self.gradient.zero_()  # in place: the parameters' gradients stay views of it
        self.saved.clear()

    def reset(self) -> None:
        """After a failed chunk: no activations, no accumulated gradient left of it."""
        self.zero_grad()
        if self.exchange is not None:
            self.exchange.reset()

    def begin(self, step: int) -> None:
        """Before step `step`: the parameters its fetches bring (`Exchange.fetch`)."""
        if self.exchange is not None:
            self.exchange.fetch(step, self.metrics)

    def finish(self, step: int, error: float) -> None:
        """After step `step`'s backward: accumulate the gradient, push when due."""
        if self.exchange is None:
            return
        start = time.perf_counter()
        # Pushed at once when every step pushes; else copied before the next step zeroes it.
        self.exchange.add(self.gradient, error, copy=self.n_push > 1)
        self.compute_s += time.perf_counter() - start
        if self.exchange.push_due(step):
            self.exchange.push(step, self.metrics)

    def begin_eval(self) -> None:
        """An evaluation copy of the part (`evaluate` runs it) at the server's values now,
        fetched from its shards; the training state (weights, activations, gradient) is left
        as it is, whatever calls come between."""
        self.evaluating = self.module
        if self.exchange is not None:
            vector, _ = self.exchange.client.fetch().result()
            self.evaluating = empty_copy(self.module).to_empty(device=self.device)
            FlatModel(self.evaluating).load(vector)

    def evaluate(self, micro: int, x: torch.Tensor) -> torch.Tensor:
        """The evaluation copy's output for `x`, in eval mode (`forward`, train=False)."""
        trained, self.module = self.module, self.evaluating
        try:
            return self.forward(micro, x, train=False)
        finally:
            self.module = trained

    def end_eval(self) -> None:
        self.evaluating = None

    def take_metrics(self) -> dict:
        """Since the last call: compute seconds, fetch and push waits, bytes handed on to the
        next stage, fetches, pushes and rejected pushes (then reset)."""
        out = {**self.metrics, **self.take_times()}
        self.metrics = dict.fromkeys(STAGE_METRICS, 0)
        return out

    def drain(self) -> dict:
        return self.exchange.drain() if self.exchange is not None else {"rejected": 0}


class PartitionedReplica:
    """Replica `index` of `config.cluster.replicas` over `count` stages reached through `call`
    (`pipeline.schedule`), `resolve` turning results into values. `run(start, steps)` returns
    the chunk's metrics as `DownpourReplica.run` does (the time split averaged over the
    partitions), plus "partitions": each stage's `take_metrics`; `drain()` waits for every
    stage's pushes.

    A chunk that raises (a partition died) leaves the replica failed: later chunks raise at
    once (they were queued before the driver knew), until `recover()` has every stage drop
    what is left of it (activations, the gradient accumulated since its last push).

    `clock` is its time (`RealClock`; a --virtual run's is simulated); `arrays` the data
    already loaded (`data.build.load_arrays`), of which it takes its slice; `handoff` and
    `watch` the pipeline's (`Pipeline`: ``direct`` where the stages can hand on to each
    other, as actors can)."""

    def __init__(self, index: int, config, call, resolve, count: int,
                 stats: dict | None = None, bound=None, clock: RealClock = REAL_CLOCK,
                 arrays: tuple | None = None, handoff: str = "driver", watch=None):
        self.index, self.config, self.call, self.resolve = index, config, call, resolve
        self.clock = clock
        self.bound = bound  # --ssp-bound (`bound.StalenessBound`), as `DownpourReplica`'s
        self.delay = straggler_delay(config, index)
        self.count = count
        self.data = build_data(config, torch.device("cpu"), stats=stats,
                               part=(index, config.cluster.replicas), arrays=arrays)
        self.pipeline = Pipeline(call, resolve, count, config.cluster.micro_batches,
                                 config.cluster.pipeline_schedule,
                                 config.cluster.pipeline_ahead, handoff, watch)
        self.cursor = BatchCursor(self.data.train)
        self.failed: BaseException | None = None

    def recover(self) -> None:
        self.resolve([self.call(p, "reset") for p in range(self.count)])
        self.failed = None
        if self.bound is not None:  # the driver made it leave the clocks
            self.bound.forget()

    def run(self, start: int, steps: int) -> dict:
        if self.failed is not None:
            raise self.failed
        try:
            return self._run(start, steps)
        except BaseException as e:
            self.failed = e
            self.cursor.lost()  # the stream is somewhere in the chunk
            raise

    def _run(self, start: int, steps: int) -> dict:
        metrics = chunk_metrics(self.index, start, steps)
        begin = self.clock.now()
        batches = self.cursor.at(start)
        exchanges = []  # begin / finish: not waited for, but their errors must surface
        for step in range(start, start + steps):
            if self.bound is not None:
                self.bound.before(step, metrics)
            exchanges += [self.call(p, "begin", step) for p in range(self.count)]
            x, y = next(batches)
            losses = self.pipeline.collect(self.pipeline.submit_passes(x, y))
            loss, wrong = sum(v for v, _ in losses), sum(w for _, w in losses)
            # The next step's calls queue behind these on each stage.
            exchanges += [self.call(p, "finish", step, wrong / len(y)) for p in range(self.count)]
            metrics["loss_sum"] += loss * len(y)
            metrics["wrong"] += wrong
            metrics["images"] += len(y)
            if self.delay:
                self.clock.sleep(self.delay)
            if self.bound is not None:
                self.bound.after(step + 1)
        stages = self.resolve(exchanges + [self.call(p, "take_metrics")
                                           for p in range(self.count)])[len(exchanges):]
        self.cursor.ended(start + steps)
        for key in ("compute_s", "fetch_wait_s", "push_wait_s"):  # per partition, on average
            metrics[key] = sum(s[key] for s in stages) / self.count
        for key in ("fetches", "pushes", "rejected"):
            metrics[key] = sum(s[key] for s in stages)
        metrics["partitions"] = stages
        metrics["seconds"] = self.clock.now() - begin
        if not math.isfinite(metrics["loss_sum"]):
            metrics["diverged"] = True
        return metrics

    def drain(self) -> dict:
        drained = self.resolve([self.call(p, "drain") for p in range(self.count)])
        return {"rejected": sum(d["rejected"] for d in drained)}

