"""The snapshot keeper on Ray: the actor holding every shard's newest snapshot on the driver's
node (`distributed.keeper` is its Ray-free core), and the shards' background sender."""

from __future__ import annotations

import threading

import ray
from ray.exceptions import RayError

from distbelief.distributed.keeper import SnapshotKeeper
from distbelief.distributed.runtime.cluster import node_id

KeeperActor = ray.remote(num_cpus=0)(SnapshotKeeper)


def start_keeper(name: str):
    """A `SnapshotKeeper` actor named `name` on this (the driver's) node: if that node is lost,
    the run is lost anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return KeeperActor.options(
        name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id(), soft=False),
    ).remote()


class SnapshotSender:
    """Sends a shard's snapshots to the keeper from a background thread, so that the shard's
    own thread (its pushes) never waits for the transfer. `busy()` is True from `send` until
    Ray holds its own copy of the snapshot's arrays: until then the caller must not reuse them
    (and skips a snapshot rather than queueing one)."""

    def __init__(self, keeper_name: str, key: str):
        self.keeper, self.key = ray.get_actor(keeper_name), key
        self.slot, self.sending, self.sent = None, False, 0
        self.ready = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name=f"snapshots-{key}").start()

    def busy(self) -> bool:
        return self.slot is not None or self.sending

    def send(self, snapshot: dict) -> None:
        with self.ready:
            self.slot, self.sending = snapshot, True
            self.ready.notify()

    def send_now(self, snapshot: dict) -> None:
        """Send and wait until the keeper has it."""
        ray.get(self.keeper.put.remote(self.key, snapshot))
        self.sent += 1

    def _run(self) -> None:
        while True:
            with self.ready:
                while self.slot is None:
                    self.ready.wait()
                snapshot, self.slot = self.slot, None
            ref = self.keeper.put.remote(self.key, snapshot)  # the arrays are in Ray's store now
            self.sending = False
            try:
                ray.get(ref)
            except RayError:
                # The keeper is gone or restarting: as the run ends (Ray shutting down while
                # a snapshot is on its way), or with the driver's node. This snapshot is not
                # counted; the next one tries again. A traceback from this thread would reach
                # the driver's terminal through Ray's log forwarding.
                continue
            self.sent += 1

    def restore(self) -> dict | None:
        """The newest snapshot the keeper holds for this key."""
        return ray.get(self.keeper.get.remote(self.key))
