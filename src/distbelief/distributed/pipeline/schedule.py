"""The pipeline schedule: one training step of a partitioned replica as calls to its stages.
No Ray here: the calls go through `call(p, method, *args)`, which runs them at once on local
`Stage`s (tests) or submits them to stage actors (`pipeline.actors`), where each result is an
object reference the next call takes as its argument.

GPipe's fill-drain (Huang et al., 2019): the forward passes of all M micro-batches, then their
backward passes in reverse order, then every stage's update. On actors every call of a step is
submitted at once; Ray runs each actor's calls in the order they were submitted and starts one
as soon as its argument exists, so stage p works on micro-batch m+1 while stage p+1 works on
m: the stages overlap, and the step's idle time per stage is the bubble, ideally
(P - 1) / (M + P - 1) of it.
"""

from __future__ import annotations

import torch


def micro_batches(x: torch.Tensor, y: torch.Tensor, count: int) -> list[tuple]:
    """(inputs, labels, weight) of each micro-batch: `count` near-equal slices (fewer when the
    batch is smaller), each weighted by its share of the batch."""
    count = max(1, min(count, len(y)))
    total = len(y)
    return [(xm, ym, len(ym) / total)
            for xm, ym in zip(torch.tensor_split(x, count), torch.tensor_split(y, count))]


class Pipeline:
    """Steps of `count` stages reached through `call` (module doc); `resolve(results)` turns
    the results of calls into values (the identity for local stages, ray.get on actors)."""

    def __init__(self, call, resolve, count: int, micro: int):
        self.call, self.resolve, self.count, self.micro = call, resolve, count, micro

    def submit_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> list:
        """Every call of one training step at `lr` (fill-drain); returns the results of the
        last stage's losses followed by the stages' updates."""
        losses = self.submit_passes(x, y)
        return losses + [self.call(p, "update", lr) for p in range(self.count)]

    def submit_passes(self, x: torch.Tensor, y: torch.Tensor) -> list:
        """The forward and backward passes of a step (gradients zeroed first, accumulated over
        the micro-batches); returns the results of the last stage's losses."""
        call, last = self.call, self.count - 1
        zeroed = [call(p, "zero_grad") for p in range(self.count)]
        losses = []
        parts = micro_batches(x, y, self.micro)
        for m, (xm, ym, weight) in enumerate(parts):
            a = xm
            for p in range(last):
                a = call(p, "forward", m, a)
            losses.append(call(last, "forward_loss", m, a, ym, weight))
        for m in reversed(range(len(parts))):
            g = call(last, "backward", m)
            for p in reversed(range(last)):
                g = call(p, "backward", m, g)
        del zeroed  # ordered before the forward passes on each stage; nothing to wait for
        return losses

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, int]:
        """One training step: (the batch's mean loss, misclassified images), once every stage
        has updated its parameters."""
        results = self.resolve(self.submit_step(x, y, lr))
        losses = results[: len(results) - self.count]
        return sum(loss for loss, _ in losses), sum(wrong for _, wrong in losses)


def local_pipeline(stages: list, micro: int) -> Pipeline:
    """A pipeline over in-process `Stage`s: every call runs at once, in order (tests, and
    the reference the actors are checked against)."""
    return Pipeline(lambda p, method, *args: getattr(stages[p], method)(*args), list,
                    len(stages), micro)
