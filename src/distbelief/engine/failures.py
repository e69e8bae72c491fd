"""The failure book of a distributed run: one death of an actor is one failure; restarts up
to --max-restarts; what each failure lost, in the run's records and counters. No Ray here."""

from __future__ import annotations

from distbelief.engine.lifecycle import RunLifecycle, describe
from distbelief.errors import DistbeliefError


class FailureBook:
    """Failures of a run's actors, each death counted once (module doc).

    `replica_failed` decides whether replica r is restarted (fewer than `max_restarts`
    restarts so far) or given up, counts and records the failure, and raises when no replica is
    left; `shard_restarted` records a shard that Ray restarted from its snapshot."""

    def __init__(self, life: RunLifecycle, replicas: int, max_restarts: int):
        self.life, self.max_restarts = life, max_restarts
        self.alive = set(range(replicas))

    def replica_failed(self, r: int, error: BaseException, position: int) -> bool:
        """Returns whether Ray restarts the replica.

        Raises:
            DistbeliefError: every replica is given up."""
        counters = self.life.counters
        restart = counters[f"replica_{r}_restarts"] < self.max_restarts
        counters["replica_failures"] += 1
        if restart:
            counters[f"replica_{r}_restarts"] += 1
            counters["replica_restarts"] += 1
        else:
            self.alive.discard(r)
        reason = describe(error)
        self.life.log({"kind": "failure", "actor": f"replica {r}", "iteration": position,
                       "wall_s": round(self.life.wall_s, 3), "restarted": restart,
                       "error": reason})
        self.life.say(f"replica {r} failed ({type(error).__name__}); "
                      + ("restarting it" if restart else "giving up on it"))
        if not self.alive:
            raise DistbeliefError(f"every replica failed more than --max-restarts "
                                  f"{self.max_restarts} times; last error: {reason}")
        return restart

    def shard_restarted(self, k: int, position: int, restored_version: int | None,
                        lost: int) -> None:
        """Shard k was restarted from its snapshot at `restored_version`, losing `lost`
        updates (at least)."""
        self.life.counters["shard_failures"] += 1
        self.life.counters["shard_updates_lost"] += lost
        self.life.log({"kind": "failure", "actor": f"shard {k}", "iteration": position,
                       "wall_s": round(self.life.wall_s, 3), "updates_lost": lost,
                       "restored_version": restored_version})
        self.life.say(f"shard {k} failed and was restarted from its snapshot at version "
                      f"{restored_version} (at least {lost} updates lost)")
