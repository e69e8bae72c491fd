"""Downpour's driver decisions: which replica trains which of its steps next. No Ray here."""

from __future__ import annotations


class WorkQueue:
    """Decides which replica trains which of its steps next; the driver makes the calls.

    A chunk is (replica, start, steps): `steps` of that replica's own steps from `start`.
    Each live replica has up to `depth` chunks queued, so it never idles while the driver is
    busy; chunks are handed out until the steps handed out reach `total`, so fast replicas do
    more. During warmstart only replica 0 gets work, up to `warmstart` steps, and the others
    wait until those are done. A failed replica's chunks are dropped and their steps handed
    out again, from its last completed step; a paused replica (one Ray is restarting) gets no
    new chunks until it is resumed.
    """

    def __init__(self, positions: list[int], total: int, warmstart: int = 0, chunk: int = 10,
                 depth: int = 2):
        self.positions = list(positions)  # completed steps per replica = its data position
        self.assigned = list(positions)  # next step to hand out, per replica
        self.queued: list[list[tuple]] = [[] for _ in positions]
        self.alive = [True] * len(positions)
        self.paused: set[int] = set()
        self.total, self.warmstart, self.chunk, self.depth = total, warmstart, chunk, depth
        self.handed = sum(positions)

    @property
    def completed(self) -> int:
        return sum(self.positions)

    def busy(self) -> bool:
        return any(self.queued)

    def all_handed(self) -> bool:
        """Whether every step up to `total` has been handed out (until a failure hands some
        out again)."""
        return self.handed >= self.total

    def take(self) -> list[tuple]:
        """New chunks to start now (possibly none)."""
        chunks = []
        for r in range(len(self.positions)):
            while self.alive[r] and r not in self.paused and len(self.queued[r]) < self.depth:
                warm = self.completed < self.warmstart
                limit = self.warmstart if warm else self.total
                if (warm and r != 0) or self.handed >= limit:
                    break
                chunk = (r, self.assigned[r], min(self.chunk, limit - self.handed))
                self.queued[r].append(chunk)
                self.assigned[r] += chunk[2]
                self.handed += chunk[2]
                chunks.append(chunk)
        return chunks

    def finished(self, chunk: tuple) -> None:
        r, start, steps = chunk
        self.queued[r].remove(chunk)
        self.positions[r] = start + steps  # a replica runs its chunks in order

    def pause(self, r: int) -> None:
        self.paused.add(r)

    def resume(self, r: int) -> None:
        self.paused.discard(r)

    def failed(self, r: int, give_up: bool = False) -> list[tuple]:
        """Drop replica r's queued chunks (returned) and hand their steps out again; with
        `give_up` the replica gets no more work."""
        dropped, self.queued[r] = self.queued[r], []
        self.handed -= sum(steps for _, _, steps in dropped)
        self.assigned[r] = self.positions[r]
        self.alive[r] = self.alive[r] and not give_up
        return dropped
