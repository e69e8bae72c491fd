"""Direct hand-offs in process (no Ray): stages on threads of their own, each running its own
passes and handing on through mailboxes, compute exactly what the driver's schedule computes;
a step abandoned by one stage's failure releases the others."""

import copy
import math
import threading
import time

import pytest
import torch

from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.relay import (NEXT, PREVIOUS, Mailbox, StepAborted,
                                                   relay_step, threaded_pipeline)
from distbelief.distributed.pipeline.schedule import Pipeline, stage_order
from distbelief.distributed.pipeline.stage import Stage
from distbelief.engine.losses import get_loss
from distbelief.models import create_model

from tests.distributed.pipeline.test_schedule import (SHAPES, assert_same, data, mlp,
                                                      pipeline_of, sgd)


def stages_of(model, parts, recompute=False):
    dtype = next(model.parameters()).dtype
    plan = partition(model, parts, torch.zeros(1, *SHAPES[type(model)], dtype=dtype))
    return [Stage(p.index, parts, p.module, get_loss("cross_entropy"),
                  sgd(p.module) if p.params else None, recompute=recompute)
            for p in plan.parts]


def run(pipeline, batches):
    torch.manual_seed(5)
    return [pipeline.step(x, y, 0.1) for x, y in batches]


@pytest.mark.parametrize("schedule,parts,micro,ahead", [
    ("1f1b", 2, 8, 1), ("1f1b", 3, 4, 0), ("1f1b", 4, 2, 2), ("gpipe", 3, 4, 0),
    ("1f1b", 2, 1, 0)])
def test_direct_hand_offs_equal_the_drivers_schedule(schedule, parts, micro, ahead):
    SHAPES.setdefault(type(create_model("resnet20", num_classes=10)), (3, 16, 16))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).double()  # BatchNorm, float64
    batches = [(x.double(), y) for x, y in data(3, (3, 16, 16), 16)]
    reference = copy.deepcopy(model)
    driver, _ = pipeline_of(reference, parts, micro, schedule, ahead=ahead)
    ref_losses = run(driver, batches)
    direct = threaded_pipeline(stages_of(model, parts), micro, schedule, ahead)
    losses = run(direct, batches)
    # Every parameter, and BatchNorm's running statistics: a stage that used another's
    # micro-batch, skipped an update or updated twice would differ.
    assert_same(reference.state_dict(), model.state_dict(), atol=1e-12)
    assert [w for _, w in losses] == [w for _, w in ref_losses]
    assert [v for v, _ in losses] == pytest.approx([v for v, _ in ref_losses], abs=1e-12)
    assert all(len(box) == 0 for box in direct.boxes)  # every hand-off was taken


def test_direct_passes_accumulate_without_updating():
    # `submit_passes` (Downpour's partitions push their gradients themselves): zeroed first,
    # accumulated over the micro-batches, no update.
    model, parts = mlp(), 3
    reference = copy.deepcopy(model)
    (x, y), = data(1, (3, 4, 4), 16)
    driver, _ = pipeline_of(reference, parts, 4, "1f1b")
    direct = threaded_pipeline(stages_of(model, parts), 4, "1f1b", 1)
    for pipeline in (driver, direct):
        pipeline.collect(pipeline.submit_passes(x, y))  # twice: the first must be zeroed
        losses = pipeline.collect(pipeline.submit_passes(x, y))
    expected = driver.collect(driver.submit_passes(x, y))
    assert [v for v, _ in losses] == pytest.approx([v for v, _ in expected], abs=1e-6)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(a, b)  # not updated
    assert torch.equal(next(model.parameters()), next(mlp().parameters()))


def test_a_stage_that_fails_releases_the_others():
    stages = stages_of(mlp(), 3)
    direct = threaded_pipeline(stages, 4, "1f1b", 1)
    (x, y), = data(1, (3, 4, 4), 16)

    def broken(*args):
        raise RuntimeError("out of memory")

    stages[2].forward_loss_backward = broken  # the others wait for it in their mailboxes
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="out of memory"):
        direct.step(x, y, 0.1)
    assert time.monotonic() - start < 5
    # The step is abandoned everywhere, and the next one runs (the stage mended).
    del stages[2].forward_loss_backward
    loss, _ = direct.step(x, y, 0.1)
    assert math.isfinite(loss) and all(len(box) == 0 for box in direct.boxes)


def test_mailbox_waits_and_an_abort_releases_the_wait():
    box = Mailbox()
    box.put((7, "F", 1), "early")  # a neighbour ahead of this stage
    box.begin(7)
    assert box.take((7, "F", 1)) == "early"
    got = []
    taker = threading.Thread(target=lambda: got.append(box.take((7, "B", 0))))
    taker.start()
    time.sleep(0.05)
    box.put((7, "B", 0), "grad")
    taker.join(2)
    assert got == ["grad"]

    def waits():
        try:
            box.take((8, "F", 0))
        except StepAborted:
            got.append("aborted")

    taker = threading.Thread(target=waits)
    taker.start()
    time.sleep(0.05)
    box.abort(8)
    taker.join(2)
    assert got[-1] == "aborted"
    box.put((8, "F", 1), "late")  # a late hand-off of the abandoned step is dropped
    assert len(box) == 0
    box.abort(9)  # an abort that comes before its step: the step's waits raise at once
    with pytest.raises(StepAborted):
        box.take((9, "F", 0))
    box.put((10, "F", 0), "next")
    box.put((6, "F", 0), "stale")
    box.begin(10)  # leftovers of other steps go; this step's stay
    assert len(box) == 1 and box.take((10, "F", 0)) == "next"


class Recorder:
    """A stage that records its passes, to check what relay_step sends where."""

    def __init__(self, index, count):
        self.index, self.count, self.calls = index, count, []

    def zero_grad(self):
        self.calls.append("zero")

    def forward(self, m, x):
        self.calls.append(("F", m, x))
        return f"a{self.index}.{m}"

    def forward_loss(self, m, x, y, w):
        self.calls.append(("FL", m, x, y, w))
        return (w, 0)

    def forward_loss_backward(self, m, x, y, w):
        self.calls.append(("FLB", m, x, y, w))
        return (w, 1), f"g{self.index}.{m}"

    def backward(self, m, grad=None):
        self.calls.append(("B", m, grad))
        return None if self.index == 0 else f"g{self.index}.{m}"

    def update(self, lr):
        self.calls.append(("U", lr))


def test_relay_step_sends_each_output_to_its_neighbour():
    sent = []
    box = Mailbox()
    middle = Recorder(1, 3)
    for m in range(2):
        box.put((5, "F", m), f"a0.{m}")
        box.put((5, "B", m), f"g2.{m}")
    out = relay_step(middle, box, lambda where, key, v: sent.append((where, key, v)), 5,
                     stage_order("1f1b", 1, 3, 2), fused=True, weights=[0.5, 0.5], lr=0.1)
    assert out == []
    assert middle.calls == ["zero", ("F", 0, "a0.0"), ("F", 1, "a0.1"), ("B", 0, "g2.0"),
                            ("B", 1, "g2.1"), ("U", 0.1)]
    assert sent == [(NEXT, (5, "F", 0), "a1.0"), (NEXT, (5, "F", 1), "a1.1"),
                    (PREVIOUS, (5, "B", 0), "g1.0"), (PREVIOUS, (5, "B", 1), "g1.1")]
    last, sent[:] = Recorder(2, 3), []
    box.put((6, "F", 0), "x")
    out = relay_step(last, box, lambda where, key, v: sent.append((where, key, v)), 6,
                     [("F", 0), ("B", 0)], fused=False, labels=["y"], weights=[1.0],
                     zero=False)
    assert out == [(1.0, 0)] and sent == [(PREVIOUS, (6, "B", 0), "g2.0")]
    assert last.calls == [("FL", 0, "x", "y", 1.0), ("B", 0, None)]  # no zero, no update


def test_the_driver_pipeline_refuses_an_unknown_hand_off():
    with pytest.raises(ValueError, match="hand-off"):
        Pipeline(None, list, 2, 2, handoff="mail")
