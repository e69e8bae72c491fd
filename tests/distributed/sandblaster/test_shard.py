"""VectorShard without Ray: each portion added once, stale rounds refused, snapshots."""

import pytest
import torch

from distbelief.distributed.keeper import SnapshotKeeper
from distbelief.distributed.sandblaster import VectorShard
from distbelief.distributed.server_model import as_tensors
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.errors import CheckpointError


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


def test_shard_snapshot_round_trip_and_foreign_snapshots(tmp_path):
    shard = VectorShard(1, 10, 20)
    shard.execute([("set", "x", torch.arange(10.0)), ("scale", "d", 2.0, "x"),
                   ("round", 3, "x")])
    save_checkpoint(tmp_path / "v.pt", as_tensors(shard.snapshot(7)))
    fresh = VectorShard(1, 10, 20)
    assert fresh.restore(load_checkpoint(tmp_path / "v.pt")) == 7
    assert set(fresh.slots) == {"x", "d"}  # the round's accumulator is not part of the state
    assert torch.equal(fresh.slots["d"], 2 * torch.arange(10.0))
    with pytest.raises(CheckpointError, match="shard 1, not"):
        VectorShard(0, 0, 10).restore(shard.snapshot(7))


def test_deltas_hold_what_was_written_and_the_keeper_merges_them():
    shard, keeper = VectorShard(0, 0, 4), SnapshotKeeper()
    shard.execute([("set", "x", torch.ones(4)), ("scale", "d", 2.0, "x"),
                   ("copy", "g", "x")])
    keeper.put("v", shard.snapshot(0, delta=True))  # everything is new: all of it
    shard.execute([("axpy", "x", 1.0, "d"), ("free", "g"), ("round", 1, "x")])
    shard.snapshot(1)  # a whole snapshot (a checkpoint's) does not count as sent
    delta = shard.snapshot(1, delta=True)
    assert set(delta["slots"]) == {"x"} and delta["names"] == ["x", "d"]
    assert keeper.put("v", delta) and not keeper.put("v", shard.snapshot(0))  # older: ignored
    rebuilt = VectorShard(0, 0, 4)
    assert rebuilt.restore(keeper.get("v")) == 1
    assert torch.equal(rebuilt.slots["x"], torch.full((4,), 3.0))
    assert torch.equal(rebuilt.slots["d"], torch.full((4,), 2.0)) and "g" not in rebuilt.slots
