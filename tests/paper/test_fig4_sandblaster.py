"""Sandblaster L-BFGS in `reproduce fig4`: its trajectory computed once, its rounds' time
simulated at each replica count (`paper.fig4_sandblaster`)."""

import pytest

from distbelief.paper import fig4
from distbelief.paper.budgets import Options
from distbelief.paper.fig4_sandblaster import round_seconds, trajectory


def config(**kw):
    base = fig4._base(Options()).replace(mode="sandblaster", batch_size=0, lr=1.0, history=10,
                                         replicas=1, ps_shards=2, virtual_spread=0.0,
                                         virtual_link="1000gb,0us")
    return base.replace(**kw)


def test_a_round_s_compute_is_shared_by_the_replicas_portion_by_portion():
    c = config(portions=64)
    # 1,600 examples in 64 portions of 25: four replicas compute 16 portions each.
    assert round_seconds(c, 1, 1e-3, 0.0, 0, 1000, 1600) == pytest.approx(1.6, rel=1e-4)
    assert round_seconds(c, 4, 1e-3, 0.0, 0, 1000, 1600) == pytest.approx(0.4, rel=1e-4)
    # 48 portions over 32 replicas: the round waits for the replicas that got two.
    assert round_seconds(c.replace(portions=48), 32, 1e-3, 0.0, 0, 1000, 1200) == \
        pytest.approx(0.05, rel=1e-4)


def test_a_round_pays_its_messages_and_the_shards_one_push_at_a_time():
    # Latency alone (1 ms): the coordinator's start (2), x's fetch (2), 16 portions each
    # reported and the next one given (32), the last push's arrival (1), the finish (2).
    c = config(portions=16, push_every=4, virtual_link="1000gb,1ms")
    assert round_seconds(c, 1, 0.0, 0.0, 0, 1000, 160) == pytest.approx(0.039, rel=1e-4)
    # Four replicas push 4 times each (every 4 of their 16 portions) to shards that take
    # 10 ms a push, one at a time: 16 x 10 ms at least, on free links and no compute.
    c = config(portions=64, push_every=4)
    assert round_seconds(c, 4, 0.0, 0.01, 0, 1000, 640) == pytest.approx(0.16, rel=1e-4)


def test_the_trajectory_is_l_bfgs_on_the_batch_until_the_target():
    found = trajectory(config(), target=0.5)
    assert found["rounds"] is not None and found["final"] <= 0.5
    assert found["rounds"] >= found["iterations"] + 1  # start, then >= 1 evaluation each
    assert found["examples"] == 1437 and found["values"] > 0
    never = trajectory(config(), target=0.0, iterations=2)
    assert never["rounds"] is None and never["final"] > 0
