"""The snapshot keeper: the newest snapshot of every shard, held on the driver's node so that a
shard Ray restarts on any node, after its process or its whole node died, starts again from it.
No Ray here (`runtime.snapshots.KeeperActor` wraps it). `SnapshotFile`: the same on disk, on
the shard's own node, for a server too large to copy in memory.

A snapshot is a dict of numpy arrays and plain values with an `order` entry (a shard's version,
or the L-BFGS iteration); snapshots of one key can arrive out of order, and an older one never
replaces a newer one. Arrays are copied out of the object store on arrival: the keeper must not
depend on the memory of the shard that sent them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


def _own(value, held=None, pool: list | None = None):
    """`value` with its arrays copied out of the object store: into the array at the same place
    in the snapshot held before, or one of `pool`, when its shape matches, else a new one. A
    fresh 100 MB array costs its page faults, several times the copy, on every snapshot."""
    if isinstance(value, np.ndarray):
        target = held if _fits(held, value) else None
        if target is None and pool:
            i = next((i for i, a in enumerate(pool) if _fits(a, value)), None)
            target = None if i is None else pool.pop(i)
        if target is None:
            return np.array(value, copy=True)
        np.copyto(target, value)
        return target
    if isinstance(value, dict):
        held = held if isinstance(held, dict) else {}
        return {k: _own(v, held.get(k), pool) for k, v in value.items()}
    return value


def _fits(array, value: np.ndarray) -> bool:
    return isinstance(array, np.ndarray) and array.shape == value.shape and \
        array.dtype == value.dtype


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
        if snapshot.get("delta"):
            snapshot = self._merged(held, snapshot)
        else:
            snapshot = _own(snapshot, held)
        self.snapshots[key] = snapshot
        return True

    @staticmethod
    def _merged(held: dict | None, delta: dict) -> dict:
        before = held["slots"] if held is not None else {}
        # Arrays of vectors that are gone (freed history pairs) hold the new ones.
        pool = [a for n, a in before.items() if n not in delta["names"]]
        slots = {n: _own(delta["slots"][n], before.get(n), pool) if n in delta["slots"]
                 else before[n] for n in delta["names"]}
        return {**{k: v for k, v in delta.items() if k != "slots"}, "slots": slots,
                "delta": False}

    def get(self, key: str) -> dict | None:
        return self.snapshots.get(key)

    def orders(self) -> dict[str, int]:
        """Each key's kept order (for tests and records)."""
        return {k: v["order"] for k, v in self.snapshots.items()}


class SnapshotFile:
    """A shard's newest snapshot as a file on its own node (--snapshot-store disk), with the
    interface of `runtime.snapshots.SnapshotSender`: `send` writes it at once, atomically,
    from the shard's live state (`ParameterShard.snapshot(live=True)`: the shard's thread
    writes it between two pushes, so nothing changes under it, and no copy of the server is
    ever made in memory); `restore` reads it back in a shard Ray restarted on the same node
    (None elsewhere: the file is lost with its node). The file is under the machine's
    temporary folder, in `run` (a name unique to the run)."""

    def __init__(self, run: str, key: str):
        self.path = Path(tempfile.gettempdir()) / "distbelief-snapshots" / run / f"{key}.pt"
        self.sent = 0

    def busy(self) -> bool:
        return False

    def send(self, snapshot: dict) -> None:
        from distbelief.distributed.server_model import as_tensors
        from distbelief.engine.checkpoint import save_checkpoint

        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.path, {"snapshot": as_tensors(snapshot)})
        self.sent += 1

    send_now = send

    def restore(self) -> dict | None:
        from distbelief.engine.checkpoint import load_checkpoint

        return load_checkpoint(self.path)["snapshot"] if self.path.is_file() else None

    def forget(self) -> None:
        """Remove the file and its run's folder, once empty (the run is over)."""
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.path.parent)):
            with contextlib.suppress(OSError):
                remove(path)
