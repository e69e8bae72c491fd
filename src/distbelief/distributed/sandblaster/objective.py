"""The Sandblaster batch objective: f(x) = mean cross-entropy over the batch + weight_decay / 2
|x|^2, computed in this process in one pass (`LocalBatchObjective`): the reference the
distributed objective is tested against. No Ray here."""

from __future__ import annotations

import math

import torch

from distbelief.data import build_data
from distbelief.distributed.flat import FlatModel
from distbelief.distributed.sandblaster.portions import batch_indices
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import build_model
from distbelief.engine.weights import load_init


class LocalBatchObjective:
    """The Sandblaster batch objective computed in this process in one pass: the reference the
    distributed version is tested against, usable with `optim.lbfgs.LBFGS` on a `LocalStore`.
    `initial` is the coordinator's starting point for the same config."""

    def __init__(self, config, device: torch.device | str = "cpu"):
        self.config, self.device = config, torch.device(device)
        data = build_data(config, self.device)
        self.stream, self.labels = data.train, data.train.labels
        self.train_size = data.train_size
        self.full_batch = config.batch_size == 0 or config.batch_size >= self.train_size
        self.dtype = getattr(torch, config.sandblaster.dtype)
        torch.manual_seed(config.seed)
        self.model = load_init(build_model(config, data, self.device), config).to(self.dtype)
        self.flat = FlatModel(self.model)
        self.loss = get_loss(config.loss)
        self.initial = self.flat.vector(self.dtype)
        self.batch = 0

    def value_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        index = batch_indices(self.train_size, self.config.batch_size, self.config.seed,
                              self.batch).to(self.device)
        self.flat.load(x)
        self.model.zero_grad(set_to_none=True)
        inputs = self.stream.inputs(index, self.dtype)
        loss = self.loss(self.model(inputs), self.labels[index], reduction="sum")
        loss.backward()
        wd, b = self.config.weight_decay, len(index)
        grad = self.flat.gradient(self.dtype).cpu() / b + wd * x
        return l2_objective(loss.item(), b, wd, float(x.dot(x))), grad.cpu()

    def evaluate(self, store, prepare, grad, then):
        store.run(prepare)
        f, g = self.value_and_grad(store.read("x"))
        return f, store.run([("set", grad, g)] + then)

    def advance(self) -> bool:
        if self.full_batch:
            return False
        self.batch += 1
        return True


def l2_objective(loss_sum: float, batch: int, weight_decay: float, xx: float) -> float:
    """The batch objective: mean cross-entropy plus weight_decay / 2 * |x|^2 (whose gradient is
    the weight_decay * x the SGD trainers add)."""
    return loss_sum / batch + weight_decay / 2 * xx if batch else math.nan
