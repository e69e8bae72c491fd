"""VectorShard without Ray: each portion added once, stale rounds refused, snapshots."""

import pytest
import torch

from distbelief.distributed.sandblaster import VectorShard
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
    shard.snapshot(tmp_path / "v.pt", iteration=7)
    fresh = VectorShard(1, 10, 20)
    assert fresh.restore(tmp_path / "v.pt") == 7
    assert set(fresh.slots) == {"x", "d"}  # the round's accumulator is not part of the state
    assert torch.equal(fresh.slots["d"], 2 * torch.arange(10.0))
    with pytest.raises(CheckpointError, match="shard 1, not"):
        VectorShard(0, 0, 10).restore(tmp_path / "v.pt")
