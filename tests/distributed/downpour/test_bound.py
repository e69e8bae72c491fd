"""--ssp-bound without Ray: the clocks' table (`ReplicaClocks`), a replica's side of it
(`StalenessBound`) and a Downpour replica waiting at the right steps."""

import math

import pytest

from distbelief.distributed.downpour.bound import ReplicaClocks, StalenessBound, describe
from distbelief.distributed.downpour.replica import DownpourReplica, LocalClient
from distbelief.distributed.pending import Done
from distbelief.data import build_data
from distbelief.errors import ConfigError
from support.downpour import TableClient, digits_config, make_shards


def test_a_replica_more_than_the_bound_ahead_of_the_slowest_may_not_go_on():
    clocks = ReplicaClocks(2)
    clocks.report(0, 1)
    clocks.report(1, 1)
    for _ in range(2):  # replica 0 trains two more steps: up to position 3
        clocks.report(0, clocks.clocks[0] + 1)
    # Its next step is at position 3, two past the slowest's clock (1): allowed; one more is not.
    assert clocks.level(0) == 1
    assert clocks.allowed(0, 3)
    clocks.report(0, 4)
    assert not clocks.allowed(0, 4)
    assert clocks.allowed(1, 1)  # the slowest always may
    clocks.report(1, 2)  # the slowest moves on: so may the fastest
    assert clocks.allowed(0, 4) and not clocks.allowed(0, 5)


def test_a_bound_of_zero_keeps_the_clocks_level():
    clocks = ReplicaClocks(0)
    clocks.report(0, 1)
    clocks.report(1, 1)
    assert clocks.allowed(0, 1) and clocks.allowed(1, 1)
    clocks.report(0, 2)
    assert not clocks.allowed(0, 2)  # one step ahead: waits for replica 1
    clocks.report(1, 2)
    assert clocks.allowed(0, 2)


def test_a_replica_joins_level_with_the_slowest_whatever_its_data_position():
    clocks = ReplicaClocks(1)
    clocks.report(0, 500)  # alone (a warmstart): its clock starts at 0, it is its own level
    assert clocks.clocks == {0: 0} and clocks.level(0) == 500 and clocks.level(1) is None
    assert clocks.allowed(0, 501) and not clocks.allowed(0, 502)
    assert clocks.allowed(1, 10 ** 6)  # not at work yet: nothing to wait for
    clocks.report(1, 3)  # joins level with replica 0, not 497 steps behind
    assert clocks.clocks == {0: 0, 1: 0}
    assert clocks.level(0) == 500 and clocks.level(1) == 3
    assert clocks.allowed(0, 501) and not clocks.allowed(0, 502)
    clocks.report(0, 501)
    clocks.report(0, 500)  # an older report arriving late moves nothing back
    assert clocks.clocks[0] == 1
    clocks.report(2, 40)  # a third joins level with the slowest (replica 1 at clock 0)
    assert clocks.clocks == {0: 1, 1: 0, 2: 0}


def test_a_replica_that_left_holds_nobody_back_and_joins_again_level():
    clocks = ReplicaClocks(1)
    clocks.report(0, 10)
    clocks.report(1, 10)
    clocks.report(0, 11)
    clocks.report(0, 12)
    assert not clocks.allowed(0, 12)
    clocks.leave(1)  # dead: replica 0 goes on alone
    assert clocks.allowed(0, 12) and clocks.level(0) == 12 and clocks.level(1) is None
    clocks.report(1, 8)  # restarted from its last completed chunk: level with replica 0 again
    assert clocks.clocks[1] == clocks.clocks[0] == 2
    assert clocks.level(1) == 8 and clocks.level(0) == 12


def test_released_clocks_let_everyone_go_on():
    clocks = ReplicaClocks(0)
    clocks.report(0, 5)
    clocks.report(1, 1)
    clocks.report(0, 6)
    assert not clocks.allowed(0, 6)
    clocks.release()
    assert clocks.allowed(0, 10 ** 9) and clocks.level(0) == math.inf
    assert clocks.report(0, 7) == math.inf


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        ReplicaClocks(-1)


class Late:
    """A pending result that has not arrived."""

    def done(self):
        return False

    def result(self):
        raise AssertionError("read before it arrived")


def test_a_replica_asks_the_table_only_when_what_it_knows_says_it_is_ahead():
    clocks = ReplicaClocks(1)
    client = TableClient(clocks)
    bound = StalenessBound(0, 1, client)
    metrics = {"bound_wait_s": 0.0}
    clocks.report(1, 0)
    bound.before(0, metrics)  # knows nothing yet: goes on without asking
    bound.after(1)  # joins level with replica 1: level at position 1
    bound.before(1, metrics)
    assert bound.known == 1
    bound.after(2)
    bound.before(2, metrics)  # one past its level: within the bound
    bound.after(3)
    assert client.reports == [(0, 1), (0, 2), (0, 3)] and client.waits == []
    clocks.report(1, 1)  # the slowest moves on (level 2), but the replica knows level 1...
    bound.answer = Late()  # ...as the newest report's answer is still on its way
    bound.before(3, metrics)  # two past what it knows: it asks, and may go on
    assert client.waits == [(0, 3)] and bound.known == 2
    assert metrics["bound_wait_s"] > 0.0


def test_an_older_answer_never_lowers_what_a_replica_knows():
    client = TableClient(ReplicaClocks(3))
    bound = StalenessBound(0, 3, client)
    bound.known = 10
    bound.answer = Done(7)  # an answer from before the wait that taught it 10
    bound.before(13, {"bound_wait_s": 0.0})
    assert bound.known == 10 and client.waits == []
    bound.answer = Late()
    bound.after(14)  # the answer waited for stays until it arrives
    assert isinstance(bound.answer, Late)
    bound.forget()  # after a failure the driver made it leave: nothing it knew holds
    assert bound.known is None and bound.answer is None and not bound.reported


def test_a_replica_that_has_joined_but_read_no_level_asks():
    clocks = ReplicaClocks(0)
    clocks.report(1, 0)
    client = TableClient(clocks)
    bound = StalenessBound(0, 0, client)
    bound.before(0, {"bound_wait_s": 0.0})  # not joined: goes on
    bound.after(1)
    bound.answer = Late()  # its report's answer is on its way: it knows no level yet
    bound.before(1, {"bound_wait_s": 0.0})  # so it asks (it joined level: it may go on)
    assert client.waits == [(0, 1)] and bound.known == 1
    bound.after(2)
    with pytest.raises(AssertionError, match="never end"):  # one ahead of replica 1
        bound.before(2, {"bound_wait_s": 0.0})


def test_a_downpour_replica_waits_before_the_steps_the_bound_forbids():
    config = digits_config(iterations=12, ssp_bound=1)
    data = build_data(config, "cpu", part=(0, 2))
    shards, _ = make_shards(config, data, 2)
    clocks = ReplicaClocks(1)
    clocks.report(1, 0)  # replica 1 is at work, and never moves
    client = TableClient(clocks)
    replica = DownpourReplica(0, config, LocalClient(shards), stats=data.stats,
                              bound=StalenessBound(0, 1, client))
    with pytest.raises(AssertionError, match="never end"):
        replica.run(0, 4)
    # It joined level with replica 1 after its first step, so position 1 is level: the
    # steps at positions 1 and 2 went on (0 and 1 ahead of the slowest), the one at 3 waits.
    assert client.reports == [(0, 1), (0, 2), (0, 3)] and client.waits == [(0, 3)]
    assert shards[0].version == 3


@pytest.mark.parametrize("settings,message", [
    ({"mode": "single", "ssp_bound": 1}, "applies to --mode downpour"),
    ({"lockstep": True, "replicas": 2, "ssp_bound": 1}, "--lockstep"),
    ({"ssp_bound": -1}, "--ssp-bound must be >= 0")])
def test_the_bound_is_refused_where_it_cannot_apply(settings, message):
    with pytest.raises(ConfigError, match=message):
        digits_config(**settings)


def test_the_driver_says_which_bound_is_in_force():
    assert "2 steps ahead" in describe(digits_config(ssp_bound=2))
    assert describe(digits_config()) == "replicas never wait for each other"
