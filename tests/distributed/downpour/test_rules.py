"""Downpour's staleness rules, each against numbers worked out by hand for a few pushes."""

import pytest
import torch

from distbelief.distributed.downpour import ParameterShard
from distbelief.distributed.downpour.rules import (corrected_momentum, delay_compensated,
                                                   describe, implicit_momentum,
                                                   lookahead_update, staleness_lr)
from distbelief.distributed.downpour.shard import async_ramp
from distbelief.engine.config import TrainConfig
from distbelief.errors import ConfigError
from distbelief.optim import CHUNK


def config(**kw):
    return TrainConfig().replace(**{"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                                    "iterations": 100, **kw})


def shard(values, **kw):
    values = torch.tensor(values)
    return ParameterShard(0, 0, len(values), len(values), values, config(**kw))


def close(t, expected):
    torch.testing.assert_close(t, torch.tensor(expected), rtol=0, atol=1e-6)


def test_the_formulas():
    assert staleness_lr(0.1, 0) == staleness_lr(0.1, 1) == 0.1
    assert staleness_lr(0.1, 4) == 0.025
    assert implicit_momentum(1.0) == 0.5 and implicit_momentum(3.0) == 0.75  # 1 - 1/N
    assert corrected_momentum(0.9, 3.0) == pytest.approx(0.15)
    assert corrected_momentum(0.5, 3.0) == 0.0  # never negative
    g, w, w0 = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.5, 0.0])
    close(delay_compensated(g, w, w0, 0.5), [2.0 + 0.5 * 4 * -0.5, -1.0 + 0.5 * 1 * 1.0])


def test_lr_rule_divides_each_step_by_its_staleness():
    s = shard([1.0, 2.0], staleness_rule="lr")
    s.push(torch.tensor([1.0, 1.0]), base_version=0)  # staleness 0: lr 0.1
    close(s.w, [0.9, 1.9])
    s.push(torch.tensor([1.0, -1.0]), base_version=0)  # staleness 1: lr 0.1
    close(s.w, [0.8, 2.0])
    s.push(torch.tensor([2.0, 2.0]), base_version=0)  # staleness 2: lr 0.05
    close(s.w, [0.7, 1.9])


def test_lr_rule_divides_adagrad_s_gamma():
    s = shard([0.0], staleness_rule="lr", optimizer="adagrad", lr=1.0)
    s.push(torch.tensor([3.0]), base_version=0)  # h = 9: w -= 1 * 3 / 3
    s.push(torch.tensor([4.0]), base_version=0)  # staleness 1, h = 25: w -= 1 * 4 / 5
    s.push(torch.tensor([0.0]), base_version=2)
    s.push(torch.tensor([12.0]), base_version=0)  # staleness 3, h = 169: w -= (1/3) * 12 / 13
    close(s.w, [-1.0 - 0.8 - 4 / 13])


def test_momentum_rule_takes_off_what_the_measured_staleness_adds():
    s = shard([1.0], staleness_rule="momentum", momentum=0.9, replicas=2)
    assert s.update.mean_staleness == 1.0  # N - 1 before any push: explicit 0.9 - 0.5
    s.push(torch.tensor([1.0]), base_version=0)  # staleness 0: mean 0.9, momentum 0.9-0.9/1.9
    m1 = 0.9 - 0.9 / 1.9
    close(s.w, [0.9])  # the first step has no history: v = g
    s.push(torch.tensor([1.0]), base_version=0)  # staleness 1: mean 0.91
    m2 = 0.9 - 0.91 / 1.91
    v = m2 * 1.0 + 1.0
    close(s.w, [0.9 - 0.1 * v])
    assert s.update.momentum() == pytest.approx(m2) and m1 > m2
    assert s.stats()["momentum"] == pytest.approx(m2)


def test_momentum_rule_is_the_recipe_s_momentum_without_staleness():
    """One replica that waits for every fetch and push: staleness 0, no correction (the parity
    of one Downpour replica with the single-process trainer rests on this)."""
    s = shard([1.0], staleness_rule="momentum", momentum=0.9, replicas=1)
    for _ in range(3):
        s.push(torch.tensor([1.0]), base_version=s.version)
    assert s.update.momentum() == 0.9
    close(s.w, [1.0 - 0.1 * (1 + 1.9 + 2.71)])


def test_dc_rule_compensates_with_what_the_pushing_replica_fetched():
    """DC-ASGD-a: lambda_t = lambda_0 / sqrt(MeanSquare), MeanSquare <- 0.95 ms + 0.05 g*g."""
    s = shard([1.0], staleness_rule="dc", dc_lambda=0.5)
    for replica in (0, 1):
        s.pull(source=replica)  # both fetch w = 1 at version 0
    s.push(torch.tensor([1.0]), 0, source=(1, "a", 1))  # fresh: g unchanged, w = 0.9
    close(s.w, [0.9])
    ms = 0.95 * 0.05 + 0.05 * 4.0
    g = 2.0 + 0.5 / (ms + 1e-7) ** 0.5 * 4.0 * (0.9 - 1.0)
    s.push(torch.tensor([2.0]), 0, source=(0, "b", 1))
    close(s.w, [0.9 - 0.1 * g])
    w = 0.9 - 0.1 * g
    assert abs(g - 2.0) > 0.3  # the adaptive term is of the gradient's size (constant: 0.2)
    s.pull(source=0)  # replica 0 fetches at version 2
    s.push(torch.tensor([1.0]), 2, source=(0, "b", 2))
    close(s.w, [w - 0.1])
    assert list(s.update.fetched[0]) == [2]  # the version-0 copy is dropped
    s.push(torch.tensor([1.0]), 1, source=(1, "a", 2))  # a fetch the shard never served
    close(s.w, [w - 0.2])
    assert s.update.uncompensated == 1 and s.stats()["uncompensated"] == 1
    ms = 0.95 * (0.95 * ms + 0.05) + 0.05  # every push moves MeanSquare, compensated or not
    close(s.update.mean_square, [ms])


def test_dc_mean_square_survives_a_snapshot():
    a = shard([1.0], staleness_rule="dc")
    a.pull(source=0)
    a.push(torch.tensor([3.0]), 0, source=(0, "a", 1))
    b = shard([0.0], staleness_rule="dc")
    b.restore(a.snapshot())
    torch.testing.assert_close(b.update.mean_square, a.update.mean_square, rtol=0, atol=0)
    assert float(b.update.mean_square) == pytest.approx(0.05 * 9)


def test_rules_survive_a_snapshot():
    a = shard([1.0, 1.0], staleness_rule="momentum", momentum=0.9, replicas=3)
    for base in (0, 0, 1):
        a.push(torch.tensor([1.0, -1.0]), base_version=base)
    b = shard([0.0, 0.0], staleness_rule="momentum", momentum=0.9, replicas=3)
    b.restore(a.snapshot())
    assert b.update.mean_staleness == a.update.mean_staleness
    for s in (a, b):
        s.push(torch.tensor([0.5, 0.5]), base_version=1)
    assert torch.equal(a.w, b.w)


def test_describe_names_the_rule_in_force():
    assert "staleness rule dana+lr" in describe(config(momentum=0.9))  # the default
    assert "Mitliagkas" in describe(config(momentum=0.9, staleness_rule="momentum"))
    assert "lambda 2" in describe(config(staleness_rule="dc"))
    for rule in ("momentum", "dana"):
        assert "do not apply" in describe(config(staleness_rule=rule, optimizer="adagrad"))
    with pytest.raises(ConfigError, match="staleness rule"):
        config(staleness_rule="stale")


def test_dana_keeps_a_momentum_per_replica_and_serves_the_look_ahead():
    s = shard([1.0], staleness_rule="dana", momentum=0.5, replicas=2)
    s.push(torch.tensor([1.0]), 0, source=(0, "a", 1))  # v0 = 1, w = 0.9
    w, version = s.pull(source=1)
    close(w, [0.9 - 0.1 * 0.5 * 1.0])  # looked ahead by v0 + v1 = 1
    s.push(torch.tensor([2.0]), 0, source=(1, "b", 1))  # v1 = 2, w = 0.7
    s.push(torch.tensor([1.0]), 1, source=(0, "a", 2))  # v0 = 0.5 + 1, w = 0.55
    close(s.w, [0.55])
    close(s.pull(source=0)[0], [0.55 - 0.05 * 3.5])
    close(s.pull()[0], [0.55])  # the driver's pull (no source): the parameters themselves
    half, _ = s.pull(source=0, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and abs(float(half) - 0.375) < 2e-3
    assert s.update.momentum() == 0.5 and "Hakimi" in describe(config(staleness_rule="dana"))


def test_dana_with_one_replica_is_torch_s_nesterov_sgd():
    """With one replica that waits for every fetch and push, the fetched look-ahead follows
    torch.optim.SGD(nesterov=True) exactly (without weight decay, which DANA takes at w)."""
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    s = shard([1.0, -1.0], staleness_rule="dana", momentum=0.9, replicas=1)
    p = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    for k in range(6):
        fetched, version = s.pull(source=0)
        torch.testing.assert_close(fetched, p.detach(), rtol=0, atol=1e-6)
        s.push(a @ fetched, version, source=(0, "x", k + 1))
        opt.zero_grad()
        (0.5 * p @ a @ p).backward()
        opt.step()


@pytest.mark.parametrize("weight_decay, nesterov, dtype", [
    (0.0, False, torch.float32), (1e-2, False, torch.float32), (1e-2, True, torch.bfloat16)])
def test_dana_fused_step_is_the_unfused_formula(weight_decay, nesterov, dtype):
    """Across chunk boundaries: v = d + m*v, total += v_new - v_old, w -= lr*v (or Nesterov's
    d + m*v), d = g + weight_decay*w; g may arrive in the transfer dtype."""
    n = 2 * CHUNK + 7
    gen = torch.Generator().manual_seed(0)
    w, v, other = (torch.randn(n, generator=gen) for _ in range(3))
    g = torch.randn(n, generator=gen).to(dtype)
    total = v + other
    d = g.float() + weight_decay * w
    v_new = 0.9 * v + d
    w_new = w - 0.1 * (d + 0.9 * v_new if nesterov else v_new)
    lookahead_update(w, g, v, total, 0.1, 0.9, weight_decay, nesterov)
    for got, want in ((v, v_new), (total, v_new + other), (w, w_new)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dana_leaves_adagrad_as_it_is():
    s = shard([0.0], staleness_rule="dana", optimizer="adagrad", lr=1.0, replicas=2)
    s.push(torch.tensor([3.0]), 0, source=(0, "a", 1))  # h = 9: w -= 3 / 3
    assert s.update.lookahead is None
    close(s.pull(source=1)[0], [-1.0])


def test_dana_survives_a_snapshot():
    a = shard([1.0, 1.0], staleness_rule="dana", momentum=0.9, replicas=2)
    for k, replica in enumerate((0, 1, 0)):
        a.push(torch.tensor([1.0, -1.0]), k, source=(replica, "r", k))
    b = shard([0.0, 0.0], staleness_rule="dana", momentum=0.9, replicas=2)
    b.restore(a.snapshot())
    assert sorted(b.update.lookahead.velocity) == [0, 1]
    for s in (a, b):
        s.push(torch.tensor([0.5, 0.5]), 3, source=(1, "r", 9))
    assert torch.equal(a.w, b.w) and torch.equal(a.pull(source=0)[0], b.pull(source=0)[0])
    # A snapshot saved under another rule: the momentum vectors start at zero.
    c = shard([0.0, 0.0], staleness_rule="momentum", momentum=0.9, replicas=2)
    d = shard([0.0, 0.0], staleness_rule="dana", momentum=0.9, replicas=2)
    d.restore(c.snapshot())
    assert d.update.lookahead.velocity == {} and not d.update.lookahead.total.any()


@pytest.mark.parametrize("settings, message", [
    ({"staleness_rule": "dana+momentum"}, "combines with lr only"),
    ({"staleness_rule": "dc+dana"}, "combines with lr only"),
])
def test_dana_refuses_what_it_cannot_combine_with(settings, message):
    with pytest.raises(ConfigError, match=message):
        config(**settings)


def test_dana_lr_looks_ahead_by_the_steps_the_shard_will_take():
    """Under dana+lr the fetched point is w minus exactly what the shard is about to apply: the
    next push of every replica, with a zero gradient and its last staleness, steps by
    lr / staleness * momentum * v (not the schedule's undivided lr)."""
    s = shard([1.0, -2.0], staleness_rule="dana+lr", momentum=0.9, replicas=3)
    for replica, staleness in ((0, 0), (1, 0), (2, 0), (0, 2), (1, 3), (2, 1), (1, 3)):
        s.push(torch.tensor([1.0, 0.5]) * (replica + 1), s.version - staleness,
               source=(replica, "r", s.version))
    ahead, _ = s.pull(source=0)
    follower = shard([0.0, 0.0], staleness_rule="dana+lr", momentum=0.9, replicas=3)
    follower.restore(s.snapshot())
    for replica, staleness in ((0, 2), (2, 1), (1, 3)):  # each replica's last staleness
        follower.push(torch.zeros(2), follower.version - staleness,
                      source=(replica, "r", 100 + replica))
    torch.testing.assert_close(ahead, follower.w, rtol=0, atol=1e-6)
    undivided = s.w - 0.1 * 0.9 * sum(s.update.lookahead.velocity.values())
    assert (ahead - undivided).abs().max() > 1e-2  # the old look-ahead went further


def test_a_retired_replica_leaves_no_momentum_in_the_look_ahead():
    s = shard([1.0], staleness_rule="dana", momentum=0.5, replicas=2)
    s.push(torch.tensor([1.0]), 0, source=(0, "a", 1))  # v0 = 1
    s.push(torch.tensor([2.0]), 0, source=(1, "b", 1))  # v1 = 2
    assert s.retire(1) and not s.retire(1)
    close(s.pull(source=0)[0], [float(s.w) - 0.1 * 0.5 * 1.0])
    assert sorted(s.stats()["lookahead_sources"]) == [0]
    b = shard([0.0], staleness_rule="dana", momentum=0.5, replicas=2)
    b.restore(s.snapshot())  # the retirement survives a snapshot
    close(b.pull(source=0)[0], [float(s.w) - 0.05])


def _lockstep_quadratic(rule, replicas=3, rounds=5, **kw):
    """Replicas in round robin on 0.5 w'Aw + b_r'w against one shard: each pushes the gradient
    at what it fetched right after its own last push (staleness replicas - 1). Returns the
    points the replicas computed at, in order."""
    from distbelief.distributed.downpour.rules import slim_momentum

    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    c = config(staleness_rule=rule, momentum=0.9, replicas=replicas, **kw)
    s = ParameterShard(0, 0, 2, 2, torch.tensor([1.0, -1.0]), c)
    slim = [slim_momentum(c) for _ in range(replicas)]
    held = [s.pull(source=r) for r in range(replicas)]
    points = []
    for step in range(rounds * replicas):
        r = step % replicas
        w, version = held[r]
        points.append(w.clone())
        g = a @ w + torch.tensor([0.1 * r, -0.2])
        if slim[r] is not None:
            g = slim[r].push(g, w)
        s.push(g, version, source=(r, "x", step + 1))
        held[r] = s.pull(source=r)
    return points


@pytest.mark.parametrize("replicas", [1, 3])
def test_dana_slim_equals_dana_zero_in_lockstep(replicas):
    zero = _lockstep_quadratic("dana", replicas)
    slim = _lockstep_quadratic("dana-slim", replicas)
    for z, s in zip(zero, slim):
        torch.testing.assert_close(s, z, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(zero[-1], _lockstep_quadratic("none", replicas)[-1], atol=1e-3)


def test_dana_slim_with_one_replica_is_torch_s_nesterov_sgd():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    p = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    points = _lockstep_quadratic("dana-slim", replicas=1, rounds=6)
    for point in points:
        torch.testing.assert_close(point, p.detach(), rtol=0, atol=1e-6)
        opt.zero_grad()
        (0.5 * p @ a @ p + torch.tensor([0.0, -0.2]) @ p).backward()
        opt.step()


def test_dana_slim_replica_pushes_d_plus_momentum_v_and_the_shard_steps_plainly():
    from distbelief.distributed.downpour.rules import SlimMomentum

    m = SlimMomentum(0.9, 0.01)
    w, g1, g2 = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5]), torch.tensor([-1.0, 1.0])
    d1 = g1 + 0.01 * w
    close(m.push(g1, w), (d1 + 0.9 * d1).tolist())
    d2 = g2 + 0.01 * w
    v2 = 0.9 * d1 + d2
    close(m.push(g2, w), (d2 + 0.9 * v2).tolist())
    close(g1, [1.0, 0.5])  # the caller's gradient is left as it was
    s = shard([1.0], staleness_rule="dana-slim+lr", momentum=0.9, weight_decay=0.5)
    assert s.update.momentum() == 0.0
    s.push(torch.tensor([2.0]), 0)
    s.push(torch.tensor([2.0]), 0)  # staleness 1: lr 0.1; no weight decay, no momentum here
    close(s.w, [1.0 - 0.4])
    s.push(torch.tensor([3.0]), 0)  # staleness 2: lr 0.05
    close(s.w, [0.6 - 0.15])


@pytest.mark.parametrize("settings, message", [
    ({"staleness_rule": "dana+dana-slim"}, "one algorithm"),
    ({"staleness_rule": "dana-slim+dc"}, "combines with lr only"),
    ({"staleness_rule": "dana-slim", "nesterov": True}, "Nesterov-shaped"),
])
def test_dana_slim_refuses_what_it_cannot_combine_with(settings, message):
    with pytest.raises(ConfigError, match=message):
        config(**settings)


def test_async_warmup_ramps_the_shards_lr_from_lr_over_the_replicas():
    # --async-warmup 8 with 4 replicas: lr x (1/4 + 3/4 * steps / 8) until 8 minibatches, then
    # the schedule's lr; each push's step is taken at the minibatches received before it.
    assert [async_ramp(s, 8, 4) for s in (0, 4, 7, 8, 100)] == [0.25, 0.625, 0.90625, 1, 1]
    s = shard([0.0], momentum=0.0, replicas=4, async_warmup=8, mode="downpour")
    steps = []
    for k in range(5):
        before = float(s.w)
        s.push(torch.tensor([1.0]), s.version, steps=2)
        steps.append(before - float(s.w))
    lrs = [0.1 * (0.25 + 0.75 * k / 8) for k in (0, 2, 4, 6)] + [0.1]
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(lrs), rtol=1e-6, atol=0)
    assert s.stats()["lr"] == pytest.approx(0.1)
    assert "--async-warmup" in describe(config(replicas=4, async_warmup=8, mode="downpour"))


def test_dana_looks_ahead_at_the_warmed_up_lr():
    # The fetch's look-ahead steps as far as the next pushes will: lr x the ramp, not the
    # schedule's lr.
    s = shard([1.0], staleness_rule="dana", momentum=0.5, replicas=2, async_warmup=4,
              mode="downpour")
    s.push(torch.tensor([1.0]), 0, source=(0, "a", 1))  # lr 0.1 x 1/2: v0 = 1, w = 0.95
    close(s.w, [0.95])
    ahead, _ = s.pull(source=1)  # after 1 minibatch: lr 0.1 x (1/2 + 1/2 x 1/4) = 0.0625
    close(ahead, [0.95 - 0.0625 * 0.5 * 1.0])


@pytest.mark.parametrize("settings,message", [
    ({"mode": "single", "async_warmup": 100}, "--mode downpour"),
    ({"mode": "downpour", "async_warmup": 100, "local_steps": 2}, "--outer-lr"),
    ({"mode": "downpour", "async_warmup": -1}, "--async-warmup must be >= 0")])
def test_async_warmup_is_refused_where_it_does_not_apply(settings, message):
    with pytest.raises(ConfigError, match=message):
        config(**settings)
