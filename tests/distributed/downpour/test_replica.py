"""DownpourReplica without Ray: n_fetch / n_push, overlap semantics, data parts and BatchNorm
statistics (its parity with the trainer: tests/parity/test_downpour.py)."""

import pytest
import torch

from distbelief.data import build_data, data_part
from distbelief.distributed.downpour import DownpourReplica, LocalClient
from distbelief.distributed.downpour.replica import FetchWait
from distbelief.distributed.flat import model_vector
from support.downpour import digits_config, make_shards


def test_n_push_accumulates_and_n_fetch_spaces_fetches():
    config = digits_config(n_push=4, n_fetch=3)
    data = build_data(config, torch.device("cpu"))
    servers, _ = make_shards(config, data, 2)
    client = SlowClient(servers, delay=0)
    metrics = DownpourReplica(0, config, client, stats=data.stats).run(0, 12)
    assert metrics["pushes"] == 3 and metrics["fetches"] == 5  # the last one is for step 12
    # Fetches at steps 0, 3, 6, 9; pushes after steps 3, 7, 11 (the one after step 11 would
    # precede a fetch at step 12, so it pulls too).
    assert [e for e in client.log if e != "wait"] == [
        "fetch", "fetch", "push", "fetch", "push", "fetch", "push+pull"]
    assert [(s.version, s.steps) for s in servers] == [(3, 12), (3, 12)]
    # Pushes 2 and 3 used parameters fetched at steps 3 and 6 and 9: one version behind each.
    assert servers[0].stats()["staleness"] == {0: 1, 1: 2}


class Delayed:
    """A Pending that arrives only after `delay` polls; result() before then counts a wait."""

    def __init__(self, value, delay, log):
        self.value, self.delay, self.log = value, delay, log

    def done(self):
        self.delay -= 1
        return self.delay < 0

    def result(self):
        if self.delay >= 0:
            self.log.append("wait")
            self.delay = -1  # it has arrived now
        return self.value.result()


class SlowClient(LocalClient):
    def __init__(self, shards, delay):
        super().__init__(shards)
        self.delay, self.log = delay, []

    def fetch(self, source=None):
        self.log.append("fetch")
        return Delayed(super().fetch(source), self.delay, self.log)

    def push(self, *args, pull=False, source=None):
        self.log.append("push+pull" if pull else "push")
        return Delayed(super().push(*args, pull=pull, source=source), self.delay, self.log)


def test_overlap_keeps_computing_while_the_server_is_slow():
    config = digits_config(overlap=True, max_in_flight=2)
    data = build_data(config, torch.device("cpu"))
    servers, _ = make_shards(config, data, 2)
    client = SlowClient(servers, delay=3)
    replica = DownpourReplica(0, config, client, stats=data.stats)
    metrics = replica.run(0, 6)
    # Only the first fetch (no parameters yet) waits; a fetch in flight is not duplicated.
    assert client.log[:2] == ["fetch", "wait"]
    assert client.log.count("fetch") < 6
    # Pushes wait only beyond max_in_flight outstanding ones.
    assert len(replica.in_flight) <= 2 and metrics["pushes"] == 6
    replica.drain()
    assert not replica.in_flight and servers[0].version == 6


def test_without_overlap_every_call_completes_before_the_next_step():
    config = digits_config(overlap=False)
    data = build_data(config, torch.device("cpu"))
    servers, _ = make_shards(config, data, 1)
    client = SlowClient(servers, delay=3)
    DownpourReplica(0, config, client, stats=data.stats).run(0, 3)
    # A push followed by a fetch goes as one call that returns the parameters.
    assert client.log == ["fetch", "wait"] + ["push+pull", "wait"] * 3


def test_unpushed_statistics_survive_a_fetch():
    config = digits_config(n_push=3)
    data = build_data(config, torch.device("cpu"))
    servers, n = make_shards(config, data, 1)
    replica = DownpourReplica(0, config, LocalClient(servers), stats=data.stats)
    replica.run(0, 2)  # two steps of statistics, not pushed yet
    local = model_vector(replica.model)[0][n:]
    replica._install(LocalClient(servers).fetch().result())
    torch.testing.assert_close(model_vector(replica.model)[0][n:], local)


def test_data_parts_are_disjoint_and_cover_the_split():
    parts = [data_part(1437, (r, 3)) for r in range(3)]
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(1437))
    assert torch.equal(data_part(10, (0, 1)), torch.arange(10))
    config = digits_config(replicas=2)
    a = build_data(config, torch.device("cpu"), part=(0, 2))
    b = build_data(config, torch.device("cpu"), part=(1, 2))
    assert a.train_size + b.train_size == 1437
    assert not torch.equal(a.train.batch(0)[0], b.train.batch(0)[0])


def test_a_push_with_nan_in_one_slice_goes_to_no_shard():
    """NaN only in the BatchNorm statistics, the last shard's slice: before, that shard
    refused the push and the others applied it."""
    config = digits_config()
    data = build_data(config, torch.device("cpu"))
    servers, _ = make_shards(config, data, 3)
    replica = DownpourReplica(0, config, LocalClient(servers), stats=data.stats)
    replica.run(0, 2)
    before = [(s.w.clone(), s.version, s.steps) for s in servers]
    bn = next(m for m in replica.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] = float("nan")
    metrics = replica.run(2, 1)
    assert metrics["rejected"] == 1 and metrics["pushes"] == 0
    assert all(torch.equal(s.w, w) and (s.version, s.steps) == (v, n)
               for s, (w, v, n) in zip(servers, before))
    assert all(s.rejected == 0 for s in servers)  # none of them saw it


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_transfer_trains_as_float32_does_to_its_precision(dtype):
    runs = {}
    for name in ("float32", dtype):
        config = digits_config(ps_transfer_dtype=name, iterations=6)
        data = build_data(config, torch.device("cpu"))
        servers, _ = make_shards(config, data, 2)
        start = torch.cat([s.w for s in servers])
        client = LocalClient(servers, dtype=getattr(torch, name))
        metrics = DownpourReplica(0, config, client, stats=data.stats).run(0, 6)
        runs[name] = (torch.cat([s.w for s in servers]), servers[0].bytes_in,
                      metrics["loss_sum"] / metrics["images"])
    (exact, bytes_exact, loss_exact), (low, bytes_low, loss_low) = runs["float32"], runs[dtype]
    assert bytes_low * 2 == bytes_exact  # half the bytes pushed
    assert not torch.equal(low, exact)  # it did round
    # Six steps apart by ~5% of the way they moved (measured); a lost or mis-read push would
    # be as far as the steps themselves.
    assert (low - exact).norm() < 0.15 * (exact - start).norm()
    assert abs(loss_low - loss_exact) < 0.05


def test_a_replica_waits_up_to_fetch_wait_s_for_its_fetch_and_computes_on_fresh_values():
    staleness = {}
    for wait in (0.0, 1.0, None):  # None, the default: up to half a step
        config = digits_config(overlap=True, fetch_wait_s=wait)
        data = build_data(config, torch.device("cpu"))
        servers, _ = make_shards(config, data, 1)
        client = SlowClient(servers, delay=2)  # each call arrives at its third look
        metrics = DownpourReplica(0, config, client, stats=data.stats).run(0, 8)
        staleness[wait] = servers[0].stats()["staleness"]
        assert metrics["pushes"] == 8
    # Without the wait a step starts before the values of the last push arrive: every push
    # after the first is one or two versions stale. With it, every step computes on the last
    # push's values.
    assert staleness[0.0][0] == 1 and sum(staleness[0.0].values()) == 8
    assert staleness[1.0] == staleness[None] == {0: 8}


def test_the_automatic_fetch_wait_is_half_a_step_and_backs_off_after_a_miss():
    wait = FetchWait(None)
    assert wait.limit() == 0.0  # no step measured yet: nothing to take half of
    wait.step_took(0.2)
    assert wait.limit() == pytest.approx(0.1)
    wait.step_took(0.4)  # an average leaning to the past: 0.8 * 0.2 + 0.2 * 0.4
    assert wait.limit() == pytest.approx(0.5 * 0.24)
    wait.waited(arrived=True)
    assert wait.limit() > 0
    wait.waited(arrived=False)  # timed out: the next 8 steps do not wait, the 9th does
    assert [wait.limit() for _ in range(9)] == [0.0] * 8 + [pytest.approx(0.12)]
    fixed = FetchWait(0.05)
    fixed.step_took(10.0)
    fixed.waited(arrived=False)
    assert fixed.limit() == 0.05  # a given wait is kept as given


def test_the_driver_says_which_fetch_wait_is_in_force():
    say = {w: FetchWait.describe(digits_config(overlap=True, fetch_wait_s=w))
           for w in (None, 0.0, 0.05)}
    assert say[None] == "waits for its fetch up to 0.5 of a step (--fetch-wait-s)"
    assert say[0.0].startswith("never waits") and "0.05 s" in say[0.05]
    assert FetchWait.describe(digits_config(overlap=False)) == "waits for every fetch (no overlap)"
