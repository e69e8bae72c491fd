"""Sandblaster's model replica: computes portions' gradients at the round's parameters and
pushes only the ones the coordinator let win. No Ray here."""

from __future__ import annotations

import threading
import time

import torch

from distbelief.data import build_data
from distbelief.distributed.flat import FlatModel
from distbelief.distributed.sandblaster.portions import batch_indices, portion_indices
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import build_model


class SandblasterReplica:
    """A model replica computing batch portions' gradients at the parameters of the round.

    `compute(round, batch, portion, solo, resolve)` first applies `resolve` = (round, portion,
    won) to the result it still holds (the coordinator's verdict on its previous portion), then
    computes the new portion's summed loss and gradient and keeps the gradient until its own
    verdict arrives. `flush(round, resolve)` applies a verdict and pushes what it holds for the
    round, returning when the shards have it; in the Ray actor it runs on its own thread, so a
    replica busy with a slow portion still flushes at once. `client` offers `pull(name)` and
    `push(round, portions, vector, solo)` (returning a pending call).
    """

    def __init__(self, index: int, config, client, stats: dict | None = None,
                 device: torch.device | str = "cpu", straggler_delay: float = 0.0):
        self.index, self.config, self.client = index, config, client
        self.device = torch.device(device)
        self.straggler_delay = straggler_delay
        data = build_data(config, self.device, stats=stats)
        stream = data.train
        self.stream, self.labels = stream, stream.labels
        self.train_size = data.train_size
        self.dtype = getattr(torch, config.sandblaster.dtype)
        self.model = build_model(config, data, self.device).to(self.dtype)
        self.flat = FlatModel(self.model)
        self.loss = get_loss(config.loss)
        self.lock = threading.Lock()  # compute and flush threads share the fields below
        self.round = None
        self.pending = None  # (round, portion, gradient, solo) awaiting its verdict
        self.acc, self.acc_portions = None, []
        self.pushes: list[tuple[list[int], object]] = []
        self._batch = (None, None)
        self.computed = 0

    def _indices(self, batch: int, portion: int) -> torch.Tensor:
        if self._batch[0] != batch:
            c = self.config
            self._batch = (batch, batch_indices(self.train_size, c.batch_size, c.seed, batch))
        return portion_indices(self._batch[1], self.config.sandblaster.portions, portion)

    def _resolve(self, resolve) -> None:
        if resolve is None or self.pending is None:
            return
        round_, portion, grad, solo = self.pending
        if (round_, portion) != tuple(resolve[:2]):
            return  # applied already (by flush or compute, whichever ran first)
        self.pending = None
        if not resolve[2] or round_ != self.round:
            return
        if solo:
            self.pushes.append(([portion], self.client.push(round_, [portion], grad, True)))
            return
        self.acc = grad if self.acc is None else self.acc.add_(grad)
        self.acc_portions.append(portion)
        if len(self.acc_portions) >= self.config.sandblaster.push_every:
            self._push_acc()

    def _push_acc(self) -> None:
        if self.acc_portions:
            self.pushes.append((self.acc_portions, self.client.push(
                self.round, self.acc_portions, self.acc, False)))
        self.acc, self.acc_portions = None, []

    def compute(self, round_: int, batch: int, portion: int, solo: bool = False,
                resolve=None) -> dict:
        start = time.perf_counter()
        with self.lock:
            self._resolve(resolve)
            fetch = round_ != self.round
            if fetch:  # a new round: what is left of an older one is stale
                self.round, self.pending, self.acc, self.acc_portions = round_, None, None, []
                self.pushes = []
        if fetch:
            self.flat.load(self.client.pull("x"))
        index = self._indices(batch, portion).to(self.device)
        x = self.stream.inputs(index, self.dtype)
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(self.model(x), self.labels[index], reduction="sum")
        loss.backward()
        loss = loss.detach()
        grad = self.flat.gradient(self.dtype).cpu()
        if self.straggler_delay:
            time.sleep(self.straggler_delay)
        with self.lock:
            if self.round == round_:
                self.pending = (round_, portion, grad, solo)
        self.computed += 1
        return {"replica": self.index, "round": round_, "portion": portion,
                "loss_sum": loss.item(), "images": len(index), "fetched": fetch,
                "seconds": time.perf_counter() - start}

    def flush(self, round_: int, resolve=None) -> dict:
        """Push everything won in `round_` and wait for the shards; returns the outcomes."""
        with self.lock:
            self._resolve(resolve)
            if self.round == round_:
                self._push_acc()
            pushes, self.pushes = self.pushes, []
        outcomes = [(portions, pending.result()) for portions, pending in pushes]
        return {"replica": self.index, "round": round_,
                "pushed": [p for portions, result in outcomes
                           if all(o in ("added", "duplicate") for o in result) for p in portions],
                "outcomes": [o for _, result in outcomes for o in result]}
