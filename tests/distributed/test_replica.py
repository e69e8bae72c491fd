"""DownpourReplica without Ray: parity with the single-process trainer, n_fetch / n_push,
overlap semantics, data parts and BatchNorm statistics."""

import pytest
import torch

from distbelief.data import build_data, data_part
from distbelief.distributed.downpour import DownpourReplica, LocalClient, initial_vector
from distbelief.distributed.downpour.shard import ParameterShard
from distbelief.distributed.flat import model_vector
from distbelief.engine import Trainer
from distbelief.engine.config import TrainConfig
from distbelief.optim import shard_bounds


def digits_config(**kw):
    settings = dict(recipe="test", model="resnet20", data="digits", batch_size=32, iterations=40,
                    lr=0.05, milestones=(12,), pad=1, flip=False, deterministic=True,
                    device="cpu", mode="downpour", overlap=False)
    return TrainConfig().replace(**{**settings, **kw})


def make_shards(config, data, count):
    w0, n_params = initial_vector(config, data)
    return [ParameterShard(k, lo, hi, n_params, w0[lo:hi], config)
            for k, (lo, hi) in enumerate(shard_bounds(w0.numel(), count))], n_params


@pytest.mark.parametrize("optimizer,lr,shards", [("sgd", 0.05, 1), ("sgd", 0.05, 3),
                                                  ("adagrad", 0.02, 2)])
def test_one_replica_equals_the_single_process_trainer(optimizer, lr, shards):
    config = digits_config(optimizer=optimizer, lr=lr, ps_shards=shards, weight_decay=5e-4)
    trainer = Trainer(config.replace(mode="single"))
    reference_start, _ = model_vector(trainer.model)
    trainer.train_until(25)
    reference, n_params = model_vector(trainer.model)

    servers, n = make_shards(config, trainer.data, shards)
    assert torch.equal(torch.cat([s.w for s in servers]), reference_start)
    replica = DownpourReplica(0, config, LocalClient(servers), stats=trainer.data.stats)
    replica.run(0, 10)
    replica.run(10, 15)  # chunks do not change the result
    server = torch.cat([s.w for s in servers])
    torch.testing.assert_close(server[:n], reference[:n], rtol=0, atol=1e-6)
    # BatchNorm statistics: the server's running average equals the trainer's.
    torch.testing.assert_close(server[n:], reference[n:], rtol=1e-6, atol=1e-6)
    assert [s.steps for s in servers] == [25] * shards


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

    def fetch(self):
        self.log.append("fetch")
        return Delayed(super().fetch(), self.delay, self.log)

    def push(self, *args, pull=False):
        self.log.append("push+pull" if pull else "push")
        return Delayed(super().push(*args, pull=pull), self.delay, self.log)


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
