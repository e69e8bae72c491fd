"""ParameterShard without Ray: update rules, buffers, staleness, NaN rejection, snapshots."""

import pytest
import torch

from distbelief.distributed.downpour import ParameterShard
from distbelief.distributed.server_model import as_tensors
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.errors import CheckpointError
from distbelief.optim import sgd_update


def config(**kw):
    """Buffers as pushed changes (--bn-stats delta): the batch statistics' fold has its own
    tests (tests/distributed/downpour/test_statistics.py)."""
    return TrainConfig().replace(**{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                                    "milestones": (3,), "iterations": 100, "bn_stats": "delta",
                                    **kw})


def shard(n_params=6, lo=0, hi=8, clock=None, **kw):
    values = torch.arange(lo, hi, dtype=torch.float32)
    extra = {"clock": clock} if clock else {}
    return ParameterShard(0, lo, hi, n_params, values, config(**kw), **extra)


def test_parameters_follow_the_rule_and_buffers_add_the_delta():
    s = shard()
    update = torch.ones(8)
    s.push(update, base_version=0)
    expected = torch.arange(8, dtype=torch.float32)
    sgd_update(expected[:6], torch.ones(6), None, 0.1, 0.9, 0.0, False)
    expected[6:] += 1
    assert torch.equal(s.w, expected)
    assert (s.version, s.steps) == (1, 1)


def test_a_slice_of_buffers_only_is_never_decayed():
    s = ParameterShard(1, 6, 8, 6, torch.zeros(2), config(weight_decay=0.5))
    assert s.split == 0
    s.push(torch.tensor([0.25, -0.5]), 0)
    assert torch.equal(s.w, torch.tensor([0.25, -0.5]))


def test_lr_schedule_counts_minibatches_not_pushes():
    s = shard()
    s.push(torch.zeros(8), 0, steps=2)
    assert s.schedule.lr_at(s.steps) == pytest.approx(0.1)
    s.push(torch.zeros(8), 1, steps=2)  # steps 2 and 3: the milestone at 3 has passed
    assert s.steps == 4 and s.stats()["lr"] == pytest.approx(0.01)


def test_staleness_is_versions_behind_at_arrival():
    s = shard()
    for _ in range(3):
        s.push(torch.zeros(8), base_version=0)
    s.push(torch.zeros(8), base_version=3)
    assert s.stats()["staleness"] == {0: 2, 1: 1, 2: 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_push_is_rejected_and_counted(bad):
    s = shard()
    before = s.w.clone()
    update = torch.ones(8)
    update[7] = bad
    reply = s.push(update, 0, steps=2)
    # Refused, but its minibatches count: every shard's lr schedule stays at the same step.
    assert reply == {"accepted": False, "version": 0, "steps": 2}
    assert torch.equal(s.w, before) and s.rejected == 1 and s.update.opt_state is None
    assert s.push(torch.ones(8), 0)["accepted"]


def test_wrong_size_push_raises():
    with pytest.raises(ValueError):
        shard().push(torch.ones(7), 0)


def test_snapshot_round_trip_continues_identically(tmp_path):
    a = shard(optimizer="adagrad")
    for i in range(3):
        a.push(torch.full((8,), float(i + 1)), i, errors=(0.5,), source=(0, "r", i + 1))
    snapshot = a.snapshot()
    assert snapshot["order"] == snapshot["version"] == 3
    # As a checkpoint file holds it (tensors), and as the keeper holds it (numpy arrays).
    save_checkpoint(tmp_path / "s.pt", {"shard": as_tensors(snapshot)})
    for state in (load_checkpoint(tmp_path / "s.pt")["shard"], snapshot):
        b = shard(optimizer="adagrad")
        assert b.restore(state) == 3
        for s in (a, b):
            s.push(torch.full((8,), 0.5), 1)
        assert torch.equal(a.w, b.w) and torch.equal(a.update.opt_state, b.update.opt_state)
        assert a.stats()["staleness"] == b.stats()["staleness"]
        a.restore(snapshot)


def test_snapshot_of_another_slice_or_rule_is_refused():
    snapshot = shard().snapshot()
    other = ParameterShard(0, 0, 8, 6, torch.zeros(8), config(optimizer="adagrad"))
    with pytest.raises(CheckpointError, match="another model, shard count or optimizer"):
        other.restore(snapshot)


def test_snapshots_are_due_on_the_clock():
    now = [0.0]
    s = shard(snapshot_every_s=5.0, clock=lambda: now[0])
    s.push(torch.ones(8), 0)
    assert not s.snapshot_due()
    now[0] = 5.0
    assert s.snapshot_due()
    assert s.snapshot()["version"] == 1 and s.snapshot_version == 1 and not s.snapshot_due()


def test_a_retried_push_is_applied_exactly_once_across_a_restore():
    """Ray retries a push that was in flight when the shard died, on the restarted shard: the
    pushes its snapshot holds are skipped, the later ones applied, each once."""
    pushes = [(torch.full((8,), float(i)), (1, "replica-1", i)) for i in range(1, 5)]
    straight = shard()
    for update, source in pushes:
        straight.push(update, 0, source=source)
    died = shard()
    for update, source in pushes[:3]:
        died.push(update, 0, source=source)
    snapshot = died.snapshot()  # push 3 is applied after it: a restart loses it
    restarted = shard()
    restarted.restore(snapshot)
    for update, source in pushes[1:]:  # Ray retries 2, 3 (applied, in the snapshot) and 4
        restarted.push(update, 0, source=source)
    assert torch.equal(restarted.w, straight.w) and restarted.version == straight.version
    assert restarted.duplicates == 2
    # A new incarnation of the replica starts its sequence again: not a duplicate.
    assert not restarted.push(torch.ones(8), 0, source=(1, "replica-1-again", 1)).get("duplicate")


def test_a_finite_push_whose_sum_overflows_is_accepted():
    s = ParameterShard(1, 6, 8, 6, torch.zeros(2), config())
    assert s.push(torch.tensor([3e38, 3e38]), 0)["accepted"]  # sum is inf, elements are not


@pytest.mark.parametrize("rule", ["momentum", "dana"])
def test_a_shard_on_threads_updates_bit_for_bit_as_on_one(rule):
    n = 5 * 65536 + 9
    values = torch.randn(n)
    settings = dict(weight_decay=1e-4, staleness_rule=rule)
    one = ParameterShard(0, 0, n, n - 4, values, config(**settings))
    three = ParameterShard(0, 0, n, n - 4, values, config(**settings, ps_threads=3))
    for k in range(3):
        g = torch.randn(n, generator=torch.Generator().manual_seed(k))
        one.push(g, one.version, source=(k % 2, "r", k))
        three.push(g, three.version, source=(k % 2, "r", k))
    assert torch.equal(one.w, three.w)
    assert torch.equal(one.pull(source=0)[0], three.pull(source=0)[0])
    if rule == "momentum":
        assert torch.equal(one.update.opt_state, three.update.opt_state)
    else:
        assert torch.equal(one.update.lookahead.total, three.update.lookahead.total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pushes_apply_their_float32_values_and_pulls_round_once(dtype):
    s, exact = shard(), shard()
    g = torch.tensor([0.3, -1.7, 2.2, 0.01, 5.0, -0.5, 0.25, 0.125]).to(dtype)
    s.push(g, 0)
    exact.push(g.float(), 0)
    assert torch.equal(s.w, exact.w) and s.bytes_in == 8 * 2  # kept in float32
    pulled, version = s.pull(dtype=dtype)
    assert pulled.dtype == dtype and version == 1
    assert torch.equal(pulled, exact.w.to(dtype)) and s.bytes_out == 8 * 2
    assert torch.equal(s.pull()[0], exact.w)  # float32 pulls (the driver's) stay exact


def test_a_shard_copies_its_values_unless_given_them():
    values = torch.arange(8.0)
    kept = ParameterShard(0, 0, 8, 8, values, config())
    taken = ParameterShard(0, 0, 8, 8, values, config(), take=True)
    values.add_(1.0)  # the caller's later writes reach only the shard it gave them to
    assert torch.equal(kept.w, torch.arange(8.0)) and torch.equal(taken.w, values)
    assert taken.w.data_ptr() == values.data_ptr()
    halves = torch.arange(8.0, dtype=torch.float16)  # another dtype is always a new vector
    assert ParameterShard(0, 0, 8, 8, halves, config(), take=True).w.dtype == torch.float32
