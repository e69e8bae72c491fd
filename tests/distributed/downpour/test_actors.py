"""Downpour's shard actor on a real local Ray: killed, Ray restarts it from the keeper's
snapshot, and the pushes Ray retries are applied once."""

import time

import numpy as np
import pytest
import torch

from distbelief.distributed.downpour import ParameterShard
from distbelief.distributed.downpour.actors import ShardActor
from distbelief.distributed.runtime.session import DriverSession
from distbelief.engine.config import TrainConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_cluster")


def config(store: str = "memory"):
    return TrainConfig().replace(lr=0.1, momentum=0.9, weight_decay=0.0, milestones=(100,),
                                 iterations=1000, snapshot_every_s=1000.0,
                                 snapshot_store=store)


# Elements 6 and 7 are buffers: a moving average (momentum 0.1) and a count.
RETENTION = np.array([0.9, 1.0], dtype=np.float32)


def until(check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_killed_shard_comes_back_with_its_snapshot_and_applies_retried_pushes_once(store):
    from distbelief.distributed.keeper import SnapshotFile

    session = DriverSession()
    session.start()  # Ray runs already (the module's cluster): the keeper only
    file = SnapshotFile(session.keeper_name, "shard-0")  # --snapshot-store disk's, this node
    try:
        [strategy] = session.place_shards(1)
        shard = ShardActor.options(name=session.name("shard-0"), max_restarts=1,
                                   max_task_retries=-1, scheduling_strategy=strategy).remote(
            0, 0, 8, 6, config(store), session.keeper_name, RETENTION)
        session.shards = [shard]
        ray.get(shard.start.remote(np.arange(8, dtype=np.float32)))
        pushes = [(np.full(8, float(i), dtype=np.float32), (1, "replica-1", i))
                  for i in range(1, 5)]
        for update, source in pushes[:2]:
            ray.get(shard.push.remote(update, 0, 1, (), source))
        snapshot = ray.get(shard.snapshot.remote())  # on its way to the keeper (or file) too
        if store == "memory":
            until(lambda: ray.get(session.keeper.orders.remote()).get("shard-0") == 2)
        else:  # written before the call returned; nothing reached the keeper
            assert file.restore()["version"] == 2 and np.array_equal(
                file.restore()["w"].numpy(), snapshot["w"])
            assert ray.get(session.keeper.orders.remote()) == {}
        ray.get(shard.push.remote(*pushes[2][:1], 0, 1, (), pushes[2][1]))  # lost with it
        ray.kill(shard, no_restart=False)
        status = until(lambda: (st := ray.get(shard.status.remote()))["reconstructed"] and st)
        values, version = ray.get(shard.pull.remote())
        assert status["restored_version"] == version == 2
        assert np.array_equal(values, snapshot["w"])
        # Ray retries what was in flight: push 2 (in the snapshot) is skipped, 3 and 4 applied.
        replies = [ray.get(shard.push.remote(u, 0, 1, (), src)) for u, src in pushes[1:]]
        assert [r.get("duplicate", False) for r in replies] == [True, False, False]
        # A restarted shard folds the buffers as before (its retention came back with it).
        reference = ParameterShard(0, 0, 8, 6, torch.arange(8.0), config(),
                                   retention=RETENTION)
        for update, source in pushes:
            reference.push(torch.from_numpy(update), 0, source=source)
        values, version = ray.get(shard.pull.remote())
        assert version == reference.version == 4
        assert np.array_equal(values, reference.w.numpy())
        ray.get(shard.forget.remote())
        assert not file.path.exists()
    finally:
        session.close()
        file.forget()


# make test-all; make test kills a shard that comes back from its snapshot (above).
@pytest.mark.slow
def test_without_snapshots_nothing_reaches_the_keeper_and_a_killed_shard_stays_dead():
    session = DriverSession()
    session.start()
    try:
        [strategy] = session.place_shards(1)
        shard = ShardActor.options(name=session.name("shard-0"), max_restarts=1,
                                   max_task_retries=0, scheduling_strategy=strategy).remote(
            0, 0, 8, 6, config().replace(snapshot_every_s=0.0), session.keeper_name, RETENTION)
        session.shards = [shard]
        ray.get(shard.start.remote(np.arange(8, dtype=np.float32)))
        ray.get(shard.push.remote(np.ones(8, dtype=np.float32), 0, 1, (), (1, "r", 1)))
        assert ray.get(shard.snapshot.remote())["version"] == 1  # for the driver's checkpoint
        assert ray.get(session.keeper.orders.remote()) == {}  # no second copy of the server
        ray.kill(shard, no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # the old incarnation may still answer; a new one never does
            try:
                assert not ray.get(shard.status.remote())["reconstructed"]
            except ray.exceptions.ActorDiedError as e:
                assert "no snapshot to restart from" in str(e)
                break
            except ray.exceptions.ActorUnavailableError:
                pass
            assert time.monotonic() < deadline, "the shard neither died nor answered"
            time.sleep(0.1)
    finally:
        session.close()


def test_one_put_or_a_slice_per_shard_apply_the_same_push_in_the_transfer_dtype():
    """RayClient puts a push once and every shard reads its span of it (or, across nodes, sends
    each its slice): both equal in-process shards given the same values, in bfloat16 on the
    way and float32 on the shards."""
    from distbelief.distributed.downpour.actors import RayClient, server_vector

    session = DriverSession()
    session.start()
    c = config().replace(ps_transfer_dtype="bfloat16", ps_threads=2)
    bounds, n = [(0, 5), (5, 12)], 12
    w0, g = torch.randn(n), torch.randn(n).to(torch.bfloat16)
    try:
        retention = [None, np.array([0.9, 0.9], dtype=np.float32)]  # shard 1's buffers
        shards = [ShardActor.remote(k, lo, hi, 10, c, session.keeper_name, retention[k])
                  for k, (lo, hi) in enumerate(bounds)]
        session.shards = shards
        results = []
        for one_put in (True, False):
            # start() begins the shards afresh at w0.
            ray.get([s.start.remote(w0[lo:hi].numpy()) for s, (lo, hi) in zip(shards, bounds)])
            client = RayClient(shards, bounds, torch.bfloat16, one_put=one_put)
            replies, (pulled, versions) = client.push(g, [0, 0], 1, (), pull=True,
                                                      source=(0, "r", 1)).result()
            assert [r["accepted"] for r in replies] == [True, True] and versions == [1, 1]
            assert pulled.dtype == torch.bfloat16
            results.append((pulled.clone(), server_vector(shards).clone()))
        local = [ParameterShard(k, lo, hi, 10, w0[lo:hi], c, retention=retention[k])
                 for k, (lo, hi) in enumerate(bounds)]
        for s, (lo, hi) in zip(local, bounds):
            s.push(g[lo:hi], 0)
        expected = torch.cat([s.w for s in local])
        # A replica's pull: the look-ahead of the default rule, dana+lr, rounded on the way.
        fetched = torch.cat([s.pull(source=0)[0] for s in local])
        assert not torch.equal(fetched, expected)
        for pulled, exact in results:
            assert torch.equal(exact, expected)  # the driver's pull: float32, exact
            assert torch.equal(pulled, fetched.to(torch.bfloat16))
    finally:
        session.close()


def _gone(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_a_snapshot_sender_outlives_a_keeper_that_is_gone():
    # As a run ends, Ray may stop the keeper while a shard's snapshot is on its way: the
    # sender's thread drops that snapshot and waits for the next, instead of dying with a
    # traceback that Ray forwards to the driver's terminal.
    import threading

    from distbelief.distributed.runtime.snapshots import SnapshotSender, start_keeper

    keeper = start_keeper("test-keeper-gone")
    sender = SnapshotSender("test-keeper-gone", "shard-9")
    snapshot = {"order": 1, "w": np.zeros(4, dtype=np.float32)}
    sender.send(snapshot)
    until(lambda: sender.sent == 1)
    ray.kill(keeper, no_restart=True)
    # ray.kill returns before the actor is gone: a snapshot sent now may still land.
    until(lambda: _gone(keeper))
    sender.send({**snapshot, "order": 2})
    until(lambda: not sender.busy())
    time.sleep(0.5)  # the failed get, handled
    thread = next(t for t in threading.enumerate() if t.name == "snapshots-shard-9")
    assert thread.is_alive() and sender.sent == 1
