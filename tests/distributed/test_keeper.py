"""The snapshot keeper (no Ray): the newest snapshot per shard, arrays of its own."""

import numpy as np

from distbelief.distributed.keeper import SnapshotKeeper


def snapshot(order, value, n=4):
    return {"order": order, "w": np.full(n, value, dtype=np.float32), "steps": order}


def test_the_newest_snapshot_is_kept_whatever_order_they_arrive_in():
    keeper = SnapshotKeeper()
    assert keeper.put("shard-0", snapshot(2, 2.0))
    assert not keeper.put("shard-0", snapshot(1, 1.0))  # late: older than the one held
    assert keeper.put("shard-1", snapshot(1, 1.0))
    assert keeper.orders() == {"shard-0": 2, "shard-1": 1}
    assert keeper.get("shard-0")["w"][0] == 2.0 and keeper.get("nobody") is None


def test_arrays_are_the_keeper_s_own_and_reused_from_snapshot_to_snapshot():
    keeper, sent = SnapshotKeeper(), snapshot(1, 1.0)
    keeper.put("k", sent)
    sent["w"][:] = 9.0  # the sender's memory changes (or goes away): the keeper's does not
    held = keeper.get("k")["w"]
    assert held[0] == 1.0
    keeper.put("k", snapshot(2, 2.0))
    assert keeper.get("k")["w"] is held and held[0] == 2.0  # same array, new values
    keeper.put("k", snapshot(3, 3.0, n=6))  # another shape: a new array
    assert keeper.get("k")["w"].shape == (6,)
