"""The pipeline schedules in process: 1F1B and GPipe's orders, the order calls are submitted
in, the same arithmetic under both and under recomputation, and the activations each holds."""

import copy

import pytest
import torch
from torch import nn

from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.schedule import (local_pipeline, stage_order,
                                                      submission_order)
from distbelief.distributed.pipeline.stage import Stage
from distbelief.engine.losses import get_loss
from distbelief.models import create_model


def test_1f1b_fills_alternates_and_drains():
    f = lambda *ms: [("F", m) for m in ms]  # noqa: E731
    b = lambda *ms: [("B", m) for m in ms]  # noqa: E731
    assert stage_order("1f1b", 0, 3, 4) == f(0, 1, 2) + b(0) + f(3) + b(1, 2, 3)
    assert stage_order("1f1b", 1, 3, 4) == f(0, 1) + b(0) + f(2) + b(1) + f(3) + b(2, 3)
    assert stage_order("1f1b", 2, 3, 4) == f(0) + b(0) + f(1) + b(1) + f(2) + b(2) + f(3) + b(3)
    assert stage_order("1f1b", 0, 4, 2) == f(0, 1) + b(0, 1)  # fewer micro-batches than stages
    assert stage_order("gpipe", 1, 3, 3) == f(0, 1, 2) + b(2, 1, 0)
    # Running one ahead: one forward more in the fill, but never on the last stage.
    assert stage_order("1f1b", 0, 3, 4, 1) == f(0, 1, 2, 3) + b(0, 1, 2, 3)
    assert stage_order("1f1b", 1, 3, 4, 1) == f(0, 1, 2) + b(0) + f(3) + b(1, 2, 3)
    assert stage_order("1f1b", 2, 3, 4, 1) == stage_order("1f1b", 2, 3, 4)
    assert stage_order("1f1b", 0, 2, 6, 1) == f(0, 1, 2) + b(0) + f(3) + b(1) + f(4) + b(2) + \
        f(5) + b(3, 4, 5)
    assert stage_order("gpipe", 1, 3, 3, 2) == stage_order("gpipe", 1, 3, 3)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("count,micro", [(2, 1), (2, 8), (3, 4), (4, 2), (5, 16)])
@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_submission_keeps_each_stage_order_and_every_dependency(schedule, count, micro, ahead):
    order = submission_order(schedule, count, micro, ahead)
    assert len(order) == len(set(order)) == 2 * count * micro
    for p in range(count):
        assert [(k, m) for q, k, m in order if q == p] == stage_order(schedule, p, count, micro,
                                                                      ahead)
    position = {call: i for i, call in enumerate(order)}
    for p, kind, m in order:
        if kind == "F" and p > 0:
            assert position[(p - 1, "F", m)] < position[(p, kind, m)]
        if kind == "B":
            assert position[(p, "F", m)] < position[(p, kind, m)]
            if p < count - 1:
                assert position[(p + 1, "B", m)] < position[(p, kind, m)]


@pytest.mark.parametrize("count,micro", [(2, 8), (3, 4), (4, 16), (4, 2)])
@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_1f1b_holds_at_most_p_micro_batches_and_gpipe_all(count, micro, ahead):
    # P - p under 1F1B, and `ahead` more on every stage but the last, whatever M.
    for schedule, bound in (
            ("1f1b", lambda p: min(count - p + (ahead if p < count - 1 else 0), micro)),
            ("gpipe", lambda p: micro)):
        for p in range(count):
            held, peak = 0, 0
            for kind, _ in stage_order(schedule, p, count, micro, ahead):
                held += 1 if kind == "F" else -1
                peak = max(peak, held)
            assert peak == bound(p), (schedule, p)


def sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def pipeline_of(model, parts, micro, schedule, recompute=False, ahead=0):
    dtype = next(model.parameters()).dtype
    plan = partition(model, parts, torch.zeros(1, *SHAPES[type(model)], dtype=dtype))
    stages = [Stage(p.index, parts, p.module, get_loss("cross_entropy"),
                    sgd(p.module) if p.params else None, recompute=recompute)
              for p in plan.parts]
    return local_pipeline(stages, micro, schedule, ahead), stages


def mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


SHAPES = {nn.Sequential: (3, 4, 4)}


def data(n, shape, size):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def trained(model, parts, micro, schedule, batches, recompute=False, ahead=0):
    pipeline, _ = pipeline_of(model, parts, micro, schedule, recompute, ahead)
    torch.manual_seed(5)  # dropout's masks: the same draws in every run
    losses = [pipeline.step(x, y, 0.1) for x, y in batches]
    return model.state_dict(), losses


def assert_same(a, b, atol=1e-6):
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("recompute,ahead", [(False, 0), (True, 0), (False, 2)])
def test_1f1b_equals_gpipe_with_batchnorm(recompute, ahead):
    SHAPES.setdefault(type(create_model("resnet20", num_classes=10)), (3, 16, 16))
    torch.manual_seed(0)
    # In float64: BatchNorm over micro-batches of 4 small images turns float32's rounding
    # (the backward passes' sums come in another order) into 4e-5 by the second step.
    model = create_model("resnet20", num_classes=10).double()
    batches = [(x.double(), y) for x, y in data(2, (3, 16, 16), 16)]
    reference, ref_losses = trained(copy.deepcopy(model), 3, 4, "gpipe", batches)
    state, losses = trained(model, 3, 4, "1f1b", batches, recompute, ahead)
    # Every buffer too: a recomputed pass that moved BatchNorm's running statistics again
    # would leave them elsewhere.
    assert_same(reference, state, atol=1e-9)
    assert [w for _, w in losses] == [w for _, w in ref_losses]
    assert [v for v, _ in losses] == pytest.approx([v for v, _ in ref_losses], abs=1e-9)


def test_recompute_draws_the_same_random_numbers():
    batches = data(3, (3, 4, 4), 16)
    reference, ref_losses = trained(mlp(0.5), 3, 4, "1f1b", batches)
    state, losses = trained(mlp(0.5), 3, 4, "1f1b", batches, recompute=True)
    assert_same(reference, state)
    assert [v for v, _ in losses] == pytest.approx([v for v, _ in ref_losses], abs=1e-6)
    moved = mlp(0.5).state_dict()
    assert any((moved[k] - state[k]).abs().max() > 1e-3 for k in state)  # it trained


def deep_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64),
                         nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def peaks(micro, schedule, recompute=False, size=4, parts=2, ahead=0):
    """Each stage's peak activation bytes over one step of `micro` micro-batches of `size`."""
    pipeline, stages = pipeline_of(deep_mlp(), parts, micro, schedule, recompute, ahead)
    (x, y), = data(1, (3, 4, 4), size * micro)
    pipeline.step(x, y, 0.1)
    return [s.take_times()["peak_activation_bytes"] for s in stages]


def test_activation_memory_per_schedule_and_recompute():
    model = deep_mlp()
    plan = partition(model, 2, torch.zeros(1, 3, 4, 4))
    assert [p.names for p in plan.parts] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    # A micro-batch of 4 into stage 0 (its images) and stage 1 (stage 0's output), float32.
    inputs = [4 * 48 * 4, 4 * 64 * 4]
    # What autograd saves, parameters left out: stage 0 its input and one tanh's output (the
    # next Linear's input), stage 1 its input, two tanh outputs and the loss's own (the
    # logits' log-softmax, the labels, a float of total weight).
    one = [inputs[0] + 4 * 64 * 4, inputs[1] + 2 * 4 * 64 * 4 + 4 * 10 * 4 + 4 * 8 + 4]
    assert peaks(1, "gpipe") == one
    # GPipe holds all M; 1F1B at most P - p, whatever M; the same micro-batch size throughout.
    assert peaks(8, "gpipe") == [8 * b for b in one]
    assert peaks(4, "1f1b") == peaks(16, "1f1b") == [2 * one[0], one[1]]
    assert peaks(4, "1f1b", ahead=1) == peaks(16, "1f1b", ahead=1) == [3 * one[0], one[1]]
    # Recomputation: the inputs of the others in flight and one micro-batch's activations.
    recomputed = peaks(4, "1f1b", recompute=True)
    assert recomputed == peaks(16, "1f1b", recompute=True) == [inputs[0] + one[0], one[1]]
    assert peaks(8, "gpipe", recompute=True) == [7 * inputs[0] + one[0],
                                                 7 * inputs[1] + one[1]]
