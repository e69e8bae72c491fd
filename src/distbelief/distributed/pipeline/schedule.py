"""The pipeline schedule: one training step of a partitioned replica as calls to its stages.
No Ray here: the calls go through `call(p, method, *args)`, which runs them at once on local
`Stage`s (tests) or submits them to stage actors (`pipeline.actors`), where each result is an
object reference the next call takes as its argument.

Two schedules (`--pipeline-schedule`), the same arithmetic in another order:

- ``gpipe``, GPipe's fill-drain (Huang et al., 2019): each stage runs the forward passes of
  all M micro-batches, then their backward passes in reverse order; every stage holds the
  activations of all M micro-batches at its peak.
- ``1f1b``, one-forward-one-backward (PipeDream-Flush, Narayanan et al., 2021): stage p of P
  runs min(P - p - 1, M) forward passes to fill the pipeline, then alternates one forward and
  one backward, then drains the backward passes left; a micro-batch's backward starts as soon
  as its forward has reached the last stage, so stage p holds at most P - p micro-batches'
  activations, whatever M. The bubble is the same as GPipe's, (P - 1) / (M + P - 1).
  With `ahead` = K (`--pipeline-ahead`), every stage but the last fills K forward passes
  more: between a micro-batch's forward and its backward, stage p then has K more passes of
  its own to run while the micro-batch's activations travel to the last stage and its
  gradient comes back (each hand-off costs milliseconds through Ray, which exact 1F1B leaves
  as idle time). Stage p < P - 1 holds at most P - p + K micro-batches, still whatever M.

Three ways to hand activations and gradients on (`--pipeline-handoff`):

- ``driver``: every pass is a call from the driver. On actors every call of a step is
  submitted at once, each stage's in its schedule's order; Ray runs each actor's calls in the
  order they were submitted and starts one as soon as its argument (the previous pass's
  result) exists, so stage p works on micro-batch m+1 while stage p+1 works on m: the stages
  overlap. Every update comes after every stage's last backward.
- ``direct``: one call per stage per step (`relay.relay_step`): each stage runs its passes in
  its order and sends its outputs straight to its neighbours, the driver off their path.
  Each stage updates after its own last pass.
- ``collective``: on the driver's side the same as ``direct``; the stages hand on as
  messages of a collective group (`link.Link`) instead of Ray calls.
"""

from __future__ import annotations

import os

import torch

SCHEDULES = ("gpipe", "1f1b")
HANDOFFS = ("direct", "collective", "driver")


def micro_batches(x: torch.Tensor, y: torch.Tensor, count: int) -> list[tuple]:
    """(inputs, labels, weight) of each micro-batch: `count` near-equal slices (fewer when the
    batch is smaller), each weighted by its share of the batch."""
    count = max(1, min(count, len(y)))
    total = len(y)
    return [(xm, ym, len(ym) / total)
            for xm, ym in zip(torch.tensor_split(x, count), torch.tensor_split(y, count))]


def stage_order(schedule: str, stage: int, count: int, micro: int, ahead: int = 0
                ) -> list[tuple[str, int]]:
    """The passes stage `stage` of `count` runs in one step, in order: ("F", m) and ("B", m)
    for micro-batch m of `micro` (under 1f1b, `ahead` more forward passes in the fill on
    every stage but the last: module doc)."""
    if schedule == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in reversed(range(micro))]
    if schedule != "1f1b":
        raise ValueError(f"unknown pipeline schedule {schedule!r}")
    warmup = min(count - stage - 1 + (ahead if stage < count - 1 else 0), micro)
    order = [("F", m) for m in range(warmup)]
    for m in range(micro - warmup):
        order += [("F", warmup + m), ("B", m)]
    return order + [("B", m) for m in range(micro - warmup, micro)]


def submission_order(schedule: str, count: int, micro: int, ahead: int = 0
                     ) -> list[tuple[int, str, int]]:
    """Every pass of a step as (stage, "F" or "B", micro-batch), each stage's in its own order
    (`stage_order`) and each after the pass it takes its argument from: a forward after the
    previous stage's forward of the same micro-batch, a backward after the next stage's
    backward (the last stage's after its own forward). Submitted in this order, no call waits
    on one submitted after it."""
    orders = [stage_order(schedule, p, count, micro, ahead) for p in range(count)]
    done: set[tuple[int, str, int]] = set()
    position, out = [0] * count, []

    def ready(p: int, kind: str, m: int) -> bool:
        if kind == "F":
            return p == 0 or (p - 1, "F", m) in done
        return (p, "F", m) in done and (p == count - 1 or (p + 1, "B", m) in done)

    while len(out) < 2 * count * micro:
        moved = False
        for p in range(count):
            while position[p] < len(orders[p]) and ready(p, *orders[p][position[p]]):
                kind, m = orders[p][position[p]]
                done.add((p, kind, m))
                out.append((p, kind, m))
                position[p] += 1
                moved = True
        if not moved:  # not reachable for the schedules above; a guard for new ones
            raise RuntimeError(f"pipeline schedule {schedule} deadlocks at {position}")
    return out


class Pipeline:
    """Steps of `count` stages reached through `call` (module doc) with `micro` micro-batches
    under `schedule` (``gpipe`` or ``1f1b``, running `ahead` passes ahead) and `handoff`
    (``driver``, ``direct`` or ``collective``: module doc); `resolve(results)` turns the
    results of calls into values (the identity for local stages, ray.get on actors). Under
    ``direct`` and ``collective``,
    `watch(results, step)`, where given, waits for a step's results and returns those to
    resolve: all of them, or the first that failed once the other stages were told to
    abandon the step (`actors.watcher`)."""

    def __init__(self, call, resolve, count: int, micro: int, schedule: str = "1f1b",
                 ahead: int = 0, handoff: str = "driver", watch=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}")
        if handoff not in HANDOFFS:
            raise ValueError(f"unknown pipeline hand-off {handoff!r}")
        self.call, self.resolve, self.count, self.micro = call, resolve, count, micro
        self.schedule, self.ahead, self.handoff, self.watch = schedule, ahead, handoff, watch
        self.last_pass = None  # the result of the last step's last pass (`submit_step`)
        self.n_losses = 0  # loss results at the head of the last step's results (driver)
        # Direct hand-offs are keyed by step number, from a random start: the steps of a
        # driver that restarted are not taken for its predecessor's on the stages.
        self.step_id = int.from_bytes(os.urandom(6), "big")

    def submit_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> list:
        """Every call of one training step at `lr`; returns its results (`collect` reads
        the losses). Through the driver every update takes the step's last pass's result
        (the first stage's last backward, which needs every other stage's last backward): on
        actors, if any pass failed, no stage updates; each update leaves its stage's
        gradients zeroed (`Stage.update`), so the step needs no `zero_grad` calls. Direct,
        each stage updates after its own last pass (a step that fails part-way may leave some
        stages updated: the runner puts every stage back to one snapshot)."""
        if self.handoff != "driver":
            return self._relay(x, y, zero=False, lr=lr)
        losses = self.submit_passes(x, y, zero=False)
        last = self.last_pass
        return losses + [self.call(p, "update", lr, last) for p in range(self.count)]

    def _relay(self, x: torch.Tensor, y: torch.Tensor, zero: bool, lr: float | None) -> list:
        """One `relay` call per stage for the next step (module doc); their results."""
        parts, last = micro_batches(x, y, self.micro), self.count - 1
        self.step_id += 1
        inputs, labels, weights = ([part[k] for part in parts] for k in range(3))
        return [self.call(p, "relay", self.step_id,
                          stage_order(self.schedule, p, self.count, len(parts), self.ahead),
                          self.schedule == "1f1b", inputs if p == 0 else None,
                          labels if p == last else None, weights, zero, lr)
                for p in range(self.count)]

    def collect(self, results: list) -> list[tuple[float, int]]:
        """The (weighted loss, misclassified) of each micro-batch of the step whose calls
        returned `results` (`submit_step`'s or `submit_passes`'), once every call is done.

        Raises:
            whatever `resolve` raises for a call that failed."""
        if self.handoff != "driver":
            if self.watch is not None:
                results = self.watch(results, self.step_id)
            return self.resolve(results)[self.count - 1]
        return self.resolve(results)[: self.n_losses]

    def submit_passes(self, x: torch.Tensor, y: torch.Tensor, zero: bool = True) -> list:
        """The forward and backward passes of a step (gradients zeroed first where `zero`,
        accumulated over the micro-batches); returns their results (`collect` reads the
        losses: through the driver they are the last stage's, in micro-batch order, at the
        head of the results)."""
        if self.handoff != "driver":
            return self._relay(x, y, zero=zero, lr=None)
        call, last = self.call, self.count - 1
        zeroed = [call(p, "zero_grad") for p in range(self.count)] if zero else []
        parts = micro_batches(x, y, self.micro)
        activations: dict[tuple[int, int], object] = {}  # (stage, m) -> its forward's result
        grads: dict[tuple[int, int], object] = {}  # (stage, m) -> its backward's result
        losses = {}
        # Under 1F1B the last stage runs each backward right after its forward: one call
        # (a Ray call costs milliseconds of the stage's time).
        fused = self.schedule == "1f1b"
        for p, kind, m in submission_order(self.schedule, self.count, len(parts), self.ahead):
            xm, ym, weight = parts[m]
            if kind == "F" and p == last:
                inputs = (m, activations.pop((p - 1, m), xm), ym, weight)
                if fused:
                    losses[m], grads[(p, m)] = call(p, "forward_loss_backward", *inputs)
                else:
                    losses[m] = call(p, "forward_loss", *inputs)
            elif kind == "F":
                activations[(p, m)] = call(p, "forward", m, activations.pop((p - 1, m), xm))
            elif not (fused and p == last):
                args = () if p == last else (grads.pop((p + 1, m)),)
                grads[(p, m)] = call(p, "backward", m, *args)
        del zeroed  # ordered before the forward passes on each stage; nothing to wait for
        self.last_pass = grads[(0, 0 if self.schedule == "gpipe" else len(parts) - 1)]
        self.n_losses = len(parts)
        return [losses[m] for m in range(len(parts))]

    def infer(self, x: torch.Tensor) -> list:
        """The model's output for `x` in eval mode, computed by the stages (the micro-batches
        pipelined through them, nothing kept for backward): the last stage's result for each
        micro-batch, in order."""
        outputs = []
        for m, xm in enumerate(torch.tensor_split(x, max(1, min(self.micro, len(x))))):
            a = xm
            for p in range(self.count):
                a = self.call(p, "forward", m, a, False)
            outputs.append(a)
        return self.resolve(outputs)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, int]:
        """One training step: (the batch's mean loss, misclassified images), once every stage
        has updated its parameters."""
        losses = self.collect(self.submit_step(x, y, lr))
        return sum(loss for loss, _ in losses), sum(wrong for _, wrong in losses)


def local_pipeline(stages: list, micro: int, schedule: str = "1f1b", ahead: int = 0
                   ) -> Pipeline:
    """A pipeline over in-process `Stage`s: every call runs at once, in order (tests, and
    the reference the actors are checked against)."""
    return Pipeline(lambda p, method, *args: getattr(stages[p], method)(*args), list,
                    len(stages), micro, schedule, ahead)
