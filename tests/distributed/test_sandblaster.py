"""Sandblaster's pieces without Ray: the shards' vectors and accumulator, the portion queue
(backup tasks, late duplicates, failures) and the replica's verdict and push protocol."""

import pytest
import torch

from distbelief.distributed.sandblaster import LocalShards, PortionQueue, VectorShard
from distbelief.distributed.sandblaster.portions import batch_indices, portion_indices
from distbelief.distributed.sandblaster.replica import SandblasterReplica
from distbelief.engine.config import TrainConfig
from distbelief.optim.lbfgs import LBFGS, FunctionObjective, LocalStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_sharded_store_computes_what_the_local_store_does():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(101, generator=g), torch.randn(101, generator=g)
    commands = [("set", "a", a), ("set", "b", b), ("lincomb", "c", 2.0, "a", -0.5, "b"),
                ("axpy", "c", 3.0, "a"), ("scale", "d", -1.0, "c"), ("copy", "e", "d"),
                ("dot", "c", "e"), ("abssum", "d"), ("absmax", "c"), ("zero", "z", "a"),
                ("dot", "z", "a"), ("free", "e")]
    local, sharded = LocalStore(), LocalShards(101, 3)
    expected, got = local.run(commands), sharded.run(commands)
    assert got == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(sharded.read("c"), local.read("c"))
    assert all("e" not in s.slots for s in sharded.shards)
    assert [s.hi - s.lo for s in sharded.shards] == [34, 34, 33]


def test_lbfgs_on_shards_matches_lbfgs_on_local_tensors():
    A = torch.diag(torch.linspace(1, 30, 40, dtype=torch.float64))
    A[0, 1] = A[1, 0] = 0.5
    fn = lambda x: (0.5 * x @ A @ x - x.sum(), A @ x - 1)  # noqa: E731
    iterates = []
    for store in (LocalStore(), LocalShards(40, 4)):
        store.run([("set", "x", torch.zeros(40, dtype=torch.float64))])
        opt = LBFGS(store, FunctionObjective(fn), history=4)
        opt.start()
        for _ in range(8):
            opt.step()
        iterates.append(store.read("x"))
    assert torch.allclose(iterates[0], iterates[1], rtol=1e-12, atol=1e-12)


def test_shard_adds_each_portion_once_and_refuses_stale_pushes():
    shard = VectorShard(0, 0, 3)
    shard.execute([("set", "x", torch.ones(3)), ("round", 7, "x")])
    one = torch.ones(3)
    assert shard.push(7, [0, 1], one, solo=False) == "added"
    assert shard.push(7, [1], one, solo=True) == "duplicate"  # a recomputed portion: skipped
    assert shard.push(7, [1, 2], one, solo=False) == "rejected"  # a dead replica's late push
    assert shard.push(6, [3], one, solo=True) == "stale"  # an earlier round's
    assert shard.push(7, [2], 2 * one, solo=True) == "added"
    assert shard.execute([("held",)]) == [3]
    assert torch.equal(shard.slots["acc"], 3 * one)
    shard.execute([("round", 8, "x")])
    assert shard.execute([("held",)]) == [0] and torch.equal(shard.slots["acc"], 0 * one)
    assert shard.stats()["rejected"] == 1 and shard.stats()["duplicate"] == 1


def test_portion_queue_hands_out_each_portion_then_backups_and_the_first_result_wins():
    q = PortionQueue(3, backup=True, clock=Clock())
    assert [q.take(0), q.take(1), q.take(0)] == [(0, False), (1, False), (2, False)]
    # Nothing new: replica 2 gets a copy of the portion running longest (0, on replica 0).
    assert q.take(2) == (0, False) and q.backups == 1
    # Replica 1 next: portion 1 is its own, 0 has its one backup, so it backs up 2.
    assert q.take(1) == (2, False) and q.backups == 2
    assert q.take(1) is None  # every unfinished portion has its backup
    assert q.finished(2, 0) is True  # the backup wins
    assert q.finished(0, 0) is False and q.wasted == 1  # the original arrives late
    assert q.finished(1, 1) and q.finished(0, 2)
    assert q.done
    assert q.finished(1, 2) is False and q.wasted == 2  # a late duplicate after the round


def test_portion_queue_without_backups_and_after_failures():
    q = PortionQueue(2, backup=False)
    assert q.take(0) == (0, False) and q.take(1) == (1, False)
    assert q.take(0) is None
    q.failed(1)  # replica 1 died with portion 1: it is handed out again
    assert q.take(0) == (1, False)
    assert q.finished(0, 0) and q.finished(0, 1) and q.done
    q.missing({1})  # won, but its gradient never reached the shards: recomputed, solo
    assert not q.done and q.take(0) == (1, True)


def test_batches_partition_the_split_per_epoch_and_full_batch_is_everything():
    assert torch.equal(batch_indices(10, 0, 0, 5), torch.arange(10))
    assert torch.equal(batch_indices(10, 20, 0, 1), torch.arange(10))
    epoch0 = torch.cat([batch_indices(10, 3, 0, k) for k in range(3)])
    assert len(set(epoch0.tolist())) == 9  # three disjoint batches, the last partial dropped
    assert not torch.equal(batch_indices(10, 3, 0, 0), batch_indices(10, 3, 0, 3))  # reshuffled
    assert torch.equal(batch_indices(10, 3, 0, 4), batch_indices(10, 3, 0, 4))
    batch = torch.arange(10)
    parts = [portion_indices(batch, 4, p) for p in range(4)]
    assert torch.equal(torch.cat(parts), batch) and [len(p) for p in parts] == [3, 3, 2, 2]


@pytest.fixture(scope="module")
def replica_setup():
    config = TrainConfig().replace(model="softmax", data="digits", mode="sandblaster", batch_size=0,
                         portions=6, push_every=2, device="cpu")
    store = LocalShards(650, 2)  # softmax on 8x8 digits: 64 * 10 + 10 parameters
    replica = SandblasterReplica(0, config, store)
    return config, store, replica


def _new_round(store, round_):
    store.run([("set", "x", torch.zeros(650)), ("round", round_, "x")])


def test_replica_pushes_only_winners_once_every_push_every(replica_setup):
    _, store, replica = replica_setup
    _new_round(store, 1)
    grads = {}
    verdict = None
    for p, win in [(0, True), (1, False), (2, True), (3, True)]:
        replica.compute(1, 0, p, False, verdict)
        grads[p] = replica.pending[2].clone()
        verdict = (1, p, win)
    # Portions 0 and 2 won and were pushed together; 3's verdict is still on its way.
    assert store.shards[0].held == {0, 2}
    out = replica.flush(1, verdict)
    assert sorted(out["pushed"]) == [0, 2, 3]
    assert store.shards[1].held == {0, 2, 3}
    assert torch.allclose(store.read("acc"), grads[0] + grads[2] + grads[3])
    # The same verdict again (the compute call and the flush both carry it): applied once.
    replica.flush(1, verdict)
    assert torch.allclose(store.read("acc"), grads[0] + grads[2] + grads[3])


def test_a_late_result_of_an_old_round_is_never_pushed(replica_setup):
    _, store, replica = replica_setup
    _new_round(store, 2)
    replica.compute(2, 0, 4, False, None)
    _new_round(store, 3)  # the round ended without this copy
    replica.compute(3, 0, 5, True, (2, 4, False))
    replica.flush(3, (3, 5, True))
    assert store.shards[0].held == {5}  # solo push of a recomputed portion
    assert store.shards[0].counts["stale"] == 0


def test_shard_snapshot_round_trip_and_foreign_snapshots(tmp_path):
    from distbelief.errors import CheckpointError

    shard = VectorShard(1, 10, 20)
    shard.execute([("set", "x", torch.arange(10.0)), ("scale", "d", 2.0, "x"),
                   ("round", 3, "x")])
    shard.snapshot(tmp_path / "v.pt", iteration=7)
    fresh = VectorShard(1, 10, 20)
    assert fresh.restore(tmp_path / "v.pt") == 7
    assert set(fresh.slots) == {"x", "d"}  # the round's accumulator is not part of the state
    assert torch.equal(fresh.slots["d"], 2 * torch.arange(10.0))
    with pytest.raises(CheckpointError, match="shard 1, not"):
        VectorShard(0, 0, 10).restore(tmp_path / "v.pt")
