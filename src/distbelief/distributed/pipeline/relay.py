"""Stages that hand their activations and gradients to each other (`--pipeline-handoff
direct`, the default on Ray). No Ray here.

With hand-offs through the driver, every pass of a step is a call from the driver, and each
micro-batch's activation crosses the driver twice on its way to the next stage: the driver
learns that the pass is done, then tells the next stage to run. Here the driver makes one call
per stage per step (`relay_step`): each stage runs its own passes in its schedule's order,
sends what it computes straight to the neighbour that needs it, and waits in its `Mailbox`
for what its neighbours send. The driver is off the pipeline's path, which is what GPipe's and
PipeDream's runtimes do with their point-to-point sends.

A stage whose neighbour died would wait for ever: the driver, seeing one stage's call fail,
`abort`s the step on every stage (`Mailbox.abort`), and their waits raise `StepAborted`.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait

from distbelief.errors import DistbeliefError

PREVIOUS, NEXT = -1, 1  # where a stage sends: the stage before it, or after it


class StepAborted(DistbeliefError):
    """A step was abandoned while this stage waited for a neighbour (`Mailbox.abort`)."""


class Mailbox:
    """What a stage's neighbours hand it, by (step, "F" or "B", micro-batch). `put` may come
    from another thread, and before the stage reaches that step; `take` waits. Steps are
    known by their numbers, which need not be in order (a driver that restarts numbers its
    steps afresh): a stage works on one step at a time."""

    KEEP_ABORTED = 64  # abandoned step numbers remembered (an abort may come before its step)

    def __init__(self):
        self._items: dict[tuple, object] = {}
        self._changed = threading.Condition()
        self._aborted: list[int] = []

    def put(self, key: tuple, value) -> None:
        with self._changed:
            if key[0] not in self._aborted:  # a late hand-off of an abandoned step is dropped
                self._items[key] = value
                self._changed.notify_all()

    def take(self, key: tuple):
        """The value handed on under `key`, once it is here.

        Raises:
            StepAborted: the key's step was abandoned (before or while waiting)."""
        with self._changed:
            while key not in self._items:
                if key[0] in self._aborted:
                    raise StepAborted(f"step {key[0]} was abandoned")
                self._changed.wait()
            return self._items.pop(key)

    def begin(self, step: int) -> None:
        """Drop what is left of other steps (an abandoned step's hand-offs); the neighbours
        may have sent this step's already."""
        with self._changed:
            self._items = {k: v for k, v in self._items.items() if k[0] == step}

    def abort(self, step: int) -> None:
        """Abandon step `step`: waits for it raise, its hand-offs go."""
        with self._changed:
            self._aborted = [*self._aborted[1 - self.KEEP_ABORTED:], step]
            self._items = {k: v for k, v in self._items.items() if k[0] != step}
            self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)


def relay_step(stage, box: Mailbox, send, step: int, order: list[tuple[str, int]], *,
               fused: bool, inputs: list | None = None, labels: list | None = None,
               weights: list[float] = (), zero: bool = True, lr: float | None = None) -> list:
    """Stage `stage`'s passes of step `step` in `order` (`schedule.stage_order`): a forward
    takes its input from `inputs` (the first stage's micro-batches) or from `box`, and sends
    its output to the NEXT stage with `send(NEXT, (step, "F", m), tensor)`; the last stage
    takes the micro-batch's `labels[m]` and `weights[m]`, and a backward sends its input's
    gradient to the PREVIOUS stage. With `fused` (1F1B) the last stage runs each backward with
    its forward (one pass, as the driver's schedule does). Gradients are zeroed first where
    `zero`; with `lr` the stage applies its update after its last pass. Returns the last
    stage's (loss, misclassified) per micro-batch, in order; [] on the others.

    Raises:
        StepAborted: the step was abandoned while this stage waited (`Mailbox.abort`)."""
    box.begin(step)
    if zero:
        stage.zero_grad()
    first, last = stage.index == 0, stage.index == stage.count - 1
    losses = {}
    for kind, m in order:
        if kind == "F":
            x = inputs[m] if first else box.take((step, "F", m))
            if not last:
                send(NEXT, (step, "F", m), stage.forward(m, x))
            elif fused:
                losses[m], grad = stage.forward_loss_backward(m, x, labels[m], weights[m])
                if not first:
                    send(PREVIOUS, (step, "B", m), grad)
            else:
                losses[m] = stage.forward_loss(m, x, labels[m], weights[m])
        elif not (fused and last):
            grad = stage.backward(m, None if last else box.take((step, "B", m)))
            if not first:
                send(PREVIOUS, (step, "B", m), grad)
    if lr is not None:
        stage.update(lr)
    return [losses[m] for m in sorted(losses)]


class ThreadedStages:
    """In-process `Stage`s reached as a direct-hand-off `Pipeline` reaches actors: `call`
    runs a `relay` on a thread of its own (other calls at once) and returns a Future, the
    stages hand on through `boxes`; `resolve` waits for Futures; `watch` abandons a step on
    every stage when one stage's relay raised (as `actors.watcher` does on Ray). The Ray-free
    reference for the stage actors. A step whose stages are still waiting after `timeout_s`
    fails with TimeoutError (a stage waiting for a hand-off that never comes)."""

    def __init__(self, stages: list, timeout_s: float = 60.0):
        self.stages, self.timeout_s = stages, timeout_s
        self.boxes = [Mailbox() for _ in stages]

    def call(self, p: int, method: str, *args) -> Future:
        done = Future()
        if method != "relay":
            done.set_result(getattr(self.stages[p], method)(*args))
            return done
        step, order, fused, inputs, labels, weights, zero, lr = args
        boxes = self.boxes

        def run() -> None:
            try:
                done.set_result(relay_step(
                    self.stages[p], boxes[p],
                    lambda where, key, value: boxes[p + where].put(key, value), step, order,
                    fused=fused, inputs=inputs, labels=labels, weights=weights, zero=zero,
                    lr=lr))
            except BaseException as e:  # noqa: BLE001 - handed to whoever resolves it
                done.set_exception(e)

        # A daemon: a stage left waiting by a bug must not keep the process from exiting.
        threading.Thread(target=run, name=f"stage-{p}", daemon=True).start()
        return done

    @staticmethod
    def resolve(futures: list[Future]) -> list:
        return [f.result() for f in futures]

    def watch(self, futures: list[Future], step: int) -> list[Future]:
        done, waiting = wait(futures, self.timeout_s, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if not failed and not waiting:
            return futures
        for box in self.boxes:
            box.abort(step)
        if wait(futures, self.timeout_s).not_done or not failed:
            raise TimeoutError(f"step {step}: stages still waiting after {self.timeout_s} s")
        return failed[:1]


def threaded_pipeline(stages: list, micro: int, schedule: str = "1f1b", ahead: int = 0):
    """A direct-hand-off `Pipeline` over in-process `Stage`s (`ThreadedStages`; its
    mailboxes are `.boxes`)."""
    from distbelief.distributed.pipeline.schedule import Pipeline

    threaded = ThreadedStages(stages)
    pipeline = Pipeline(threaded.call, threaded.resolve, len(stages), micro, schedule, ahead,
                        handoff="direct", watch=threaded.watch)
    pipeline.boxes = threaded.boxes
    return pipeline
