"""The virtual cluster's cost model: how long a replica computes a step, a message takes on the
network and a shard takes to apply a push (`virtual`). No Ray.

- **Compute**: --virtual-step-ms (default: measured here, `measure_step`), times a log-normal
  factor of mean 1 and sigma --virtual-spread, times X with probability P
  (--virtual-straggle P,X); each replica draws from its own generator (seed, replica), so a
  virtual run repeats exactly.
- **Partitions** (--partitions P): each partition of a replica is a node of its own; a
  pass of stage p over a micro-batch takes the step's time x p's share of the multiply-adds x
  the micro-batch's share of the batch x 1/3 (forward) or 2/3 (backward), each drawn as
  above from the partition's own generator; activations and their gradients cross the links.
- **Network** (`Network`): every replica and every shard has a node of its own (as in the
  paper) with one link of --virtual-link BANDWIDTH,LATENCY. A message occupies its sender's
  outgoing and its receiver's incoming link for bytes / bandwidth (each link carries one
  message at a time, in the order they were sent) and arrives a latency later.
- **Shards**: a shard serves one request at a time, in arrival order; a push takes
  --virtual-shard-ms (default: measured here, `measure_shard`), a pull the copy of its values
  (measured alike; no time when --virtual-shard-ms is given).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from distbelief.engine.config import parse_straggle

REQUEST_BYTES = 256  # a fetch request or a push's reply: a few numbers and Ray's header


class StepTimes:
    """Replica `replica`'s compute time per step (module doc): `next()` draws the next one.
    A partition's (`part`) draws come from a generator of its own."""

    def __init__(self, config, replica: int, step_s: float, part: int | None = None):
        d = config.downpour
        self.step_s, self.sigma = step_s, d.virtual_spread
        self.p, self.factor = parse_straggle(d.virtual_straggle)
        key = [config.seed, replica, 0x5EED] + ([] if part is None else [part])
        self.rng = np.random.default_rng(key)

    def next(self) -> float:
        # Log-normal of mean 1: exp(N(-sigma^2 / 2, sigma)).
        t = self.step_s * math.exp(self.rng.normal(-self.sigma ** 2 / 2, self.sigma)) \
            if self.sigma else self.step_s
        if self.p and self.rng.random() < self.p:
            t *= self.factor
        return t


class Network:
    """Links of `bandwidth` bytes per second and `latency` seconds, one per node (module
    doc): `send(now, source, target, nbytes)` is when the message arrives."""

    def __init__(self, bandwidth: float, latency: float):
        self.bandwidth, self.latency = bandwidth, latency
        self.out_free: dict = {}  # node -> when its outgoing link is free
        self.in_free: dict = {}
        self.bytes = 0

    def send(self, now: float, source, target, nbytes: int) -> float:
        if source == target:
            return now
        self.bytes += nbytes
        busy = nbytes / self.bandwidth
        start = max(now, self.out_free.get(source, 0.0))
        self.out_free[source] = start + busy
        # Received as it is sent, unless the receiver's link is still busy with another.
        received = max(start, self.in_free.get(target, 0.0)) + busy
        self.in_free[target] = received
        return received + self.latency


def measure_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config,
                 repeats: int = 5) -> float:
    """Seconds of one training step on this machine: the median of `repeats` forward and
    backward passes of `model` (in training mode; its gradients are overwritten) on the batch
    (x, y), with `config`'s loss, layout and autocast, and the gradient flattened as a replica
    flattens it, after one pass that warms up."""
    from distbelief.distributed.flat import FlatModel
    from distbelief.engine.losses import get_loss

    model.train()
    flat, loss_fn = FlatModel(model), get_loss(config.loss)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = loss_fn(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        flat.gradient()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_shard(shard, repeats: int = 5) -> tuple[float, float]:
    """(seconds per push, seconds per pull) of a shard like `shard` on this machine: the
    median of `repeats` of each on a copy (the shard itself is not touched)."""
    from distbelief.distributed.downpour.shard import ParameterShard

    copy = ParameterShard(shard.index, shard.lo, shard.hi, shard.lo + shard.split, shard.w,
                          shard.config,
                          retention=shard.retention)
    zeros = torch.zeros_like(copy.w)
    pushes, pulls = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        copy.push(zeros, copy.version)
        pushes.append(time.perf_counter() - start)
        start = time.perf_counter()
        copy.pull()
        pulls.append(time.perf_counter() - start)
    return float(np.median(pushes)), float(np.median(pulls))
