"""Local steps with delta pushes (--local-steps H): the replica's side. Plain Python: no Ray.

A replica takes H plain SGD steps on its own copy of the model (the recipe's lr schedule and
weight decay, no momentum), then pushes the change of its parameters since they were last
fetched or pushed, `base - w`, in place of a gradient. The shard applies that change as one
outer step with the recipe's momentum at --outer-lr (`ParameterShard.lr`; `rules.StaleUpdate`
takes no weight decay of its own, the replica took it): SGD's momentum moved from the
minibatches to the rounds, as in EASGD (Zhang et al., 2015) and DiLoCo (Douillard et al.,
2023), whose outer step is Nesterov's momentum on the averaged change. Here every replica's
change is applied as it arrives (Downpour's way), so H local steps cut the pushes and round
trips by H; a push is still N - 1 pushes stale with N replicas, each of H minibatches.

With one replica, H = 1 and outer lr 1 this is the recipe's SGD exactly: the change is
lr * (g + weight_decay * w), and the outer step v = m * v + change, w -= change + m * v
(Nesterov; v without it) is torch's SGD with v = lr * momentum buffer
(tests/distributed/downpour/test_local_steps.py).

The lr of a local step is the recipe's schedule at the replica's step times the replicas
(the minibatches all replicas have trained by then: exact in lockstep, about right on Ray),
so that milestones and warmups are in minibatches over all replicas, as the shards' are.
"""

from __future__ import annotations

import torch

from distbelief.distributed.flat import FlatModel
from distbelief.engine.schedule import LRSchedule


class LocalSteps:
    """The plain SGD steps a replica takes between its pushes, and the change it pushes.

    `started()` after parameters are installed (the change is counted from there);
    `step(index, error)` after a backward pass, with the replica's own step index;
    `change()` at a push: base - w as a new float32 tensor on the model's device, the base
    then moved to w (the next change counts from the parameters the replica goes on from,
    unless a fetch is installed first).
    """

    def __init__(self, config, flat: FlatModel):
        self.flat, self.replicas = flat, config.cluster.replicas
        self.schedule = LRSchedule(config)
        self.optimizer = torch.optim.SGD(list(flat.model.parameters()), lr=config.lr, momentum=0.0,
                                         weight_decay=config.weight_decay)
        self.base: torch.Tensor | None = None

    def started(self) -> None:
        self.base = self.flat.parameter_vector()

    def lr_at(self, step: int) -> float:
        return self.schedule.lr_at(step * self.replicas)

    def step(self, step: int, error: float | None = None) -> None:
        """One SGD step on the replica's copy with its gradients (`error`, this step's
        training error, feeds an error-triggered warmup)."""
        if error is not None and self.schedule.needs_error:
            self.schedule.observe(step * self.replicas, float(error))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.step()

    def change(self) -> torch.Tensor:
        now = self.flat.parameter_vector()
        delta = self.base.sub_(now)  # the base is not needed again: reuse its memory
        self.base = now
        return delta
