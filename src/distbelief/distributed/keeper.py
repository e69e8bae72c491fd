"""The snapshot keeper: the newest snapshot of every shard, held on the driver's node so that a
shard Ray restarts on any node, after its process or its whole node died, starts again from it.
No Ray here (`runtime.KeeperActor` wraps it).

A snapshot is a dict of numpy arrays and plain values with an `order` entry (a shard's version,
or the L-BFGS iteration); snapshots of one key can arrive out of order, and an older one never
replaces a newer one. Arrays are copied out of the object store on arrival: the keeper must not
depend on the memory of the shard that sent them.
"""

from __future__ import annotations

import numpy as np


def _own(value, held=None):
    """`value` with its arrays copied out of the object store, into the arrays of `held` (the
    same place in the snapshot held before) where their shapes match: a fresh 100 MB array
    costs its page faults, several times the copy, on every snapshot."""
    if isinstance(value, np.ndarray):
        if isinstance(held, np.ndarray) and held.shape == value.shape and \
                held.dtype == value.dtype:
            np.copyto(held, value)
            return held
        return np.array(value, copy=True)
    if isinstance(value, dict):
        held = held if isinstance(held, dict) else {}
        return {k: _own(v, held.get(k)) for k, v in value.items()}
    return value


class SnapshotKeeper:
    def __init__(self):
        self.snapshots: dict[str, dict] = {}
        self.received = 0

    def put(self, key: str, snapshot: dict) -> bool:
        """Keep `snapshot` as `key`'s unless a newer one is kept; True when it was kept. A
        snapshot with "delta" holds only the "slots" written since the previous one and lists
        all of them in "names": the others are taken from the one held."""
        self.received += 1
        held = self.snapshots.get(key)
        if held is not None and held["order"] > snapshot["order"]:
            return False
        snapshot = _own(snapshot, held)
        if snapshot.get("delta"):
            before = held["slots"] if held is not None else {}
            snapshot["slots"] = {n: snapshot["slots"][n] if n in snapshot["slots"] else before[n]
                                 for n in snapshot["names"]}
            snapshot["delta"] = False
        self.snapshots[key] = snapshot
        return True

    def get(self, key: str) -> dict | None:
        return self.snapshots.get(key)

    def orders(self) -> dict[str, int]:
        """Each key's kept order (for tests and records)."""
        return {k: v["order"] for k, v in self.snapshots.items()}
