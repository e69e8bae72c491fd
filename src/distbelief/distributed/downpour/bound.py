"""Stale synchronous parallel replicas (--ssp-bound S; Ho et al., 2013, "More Effective
Distributed ML via a Stale Synchronous Parallel Parameter Server"). No Ray here.

Downpour's replicas never wait for each other, so a replica that falls behind (a slower node,
a restart, a busy core) computes gradients that the others' pushes have long overtaken: its
staleness grows with how far behind it is, without limit. Under SSP each replica has a clock,
the steps it has trained, and one that is more than S steps ahead of the slowest replica at
work waits before its next step; so no gradient is computed more than about (N - 1) x (S + 1)
versions behind the server (N replicas), whatever the machines' speeds. S = 0 keeps the
replicas' clocks level (each step waits for the slowest to finish the one before); with
replicas of equal speed a bound above 0 rarely binds.

`ReplicaClocks` is the table (held by one Ray actor, `actors.ClockActor`); `StalenessBound`
is a replica's side of it. Clocks are aligned, not raw data positions: a replica joining (its
first report, or after it left) starts level with the slowest replica at work, so a warmstart,
a restart or a replica that trained more before does not hold the others back. A replica that
dies leaves (the driver), and when the work is all handed out the table is released, so that
nobody waits for a replica with nothing left to do.
"""

from __future__ import annotations

import math
import time


def describe(config) -> str:
    """The bound in force, in one line (the driver prints it)."""
    bound = config.downpour.ssp_bound
    if bound is None:
        return "replicas never wait for each other"
    return (f"a replica more than {bound} steps ahead of the slowest waits for it "
            f"(--ssp-bound, Ho 2013)")


class ReplicaClocks:
    """The clocks of the replicas at work under a bound of `bound` steps (module doc).

    `report(r, position)` after replica r trained up to its data position `position`;
    `allowed(r, position)`: whether r may train the step at `position`; `leave(r)`: r is gone
    (its clock no longer holds anybody back); `release()`: from now on nobody waits.
    Positions are a replica's own steps; clocks are positions less the replica's offset, set
    when it joins so that it starts level with the slowest of the others."""

    def __init__(self, bound: int):
        if bound < 0:
            raise ValueError(f"a staleness bound is a number of steps >= 0, got {bound}")
        self.bound = bound
        self.clocks: dict[int, int] = {}
        self.offsets: dict[int, int] = {}
        self.released = False

    def slowest(self, exclude: int | None = None) -> int | None:
        """The lowest clock among the replicas at work other than `exclude` (None: none)."""
        others = [c for r, c in self.clocks.items() if r != exclude]
        return min(others) if others else None

    def report(self, replica: int, position: int) -> float | None:
        """Replica `replica` has trained up to `position` (an older report arriving late
        moves nothing back); returns its `level`."""
        if replica not in self.clocks:
            start = self.slowest(replica)
            # Joining: level with the slowest (the first replica's clock starts at 0).
            self.offsets[replica] = position - (0 if start is None else start)
        clock = position - self.offsets[replica]
        self.clocks[replica] = max(self.clocks.get(replica, clock), clock)
        return self.level(replica)

    def level(self, replica: int) -> float | None:
        """The position at which `replica` is level with the slowest of the others (alone,
        its own: a replica joining later starts level with it): it may train up to `bound`
        steps past it. It never falls while the replica stays. inf once released; None when
        the replica is not at work (it has not reported, or it left)."""
        if self.released:
            return math.inf
        if replica not in self.clocks:
            return None
        slowest = self.slowest(replica)
        return (self.clocks[replica] if slowest is None else slowest) + self.offsets[replica]

    def allowed(self, replica: int, position: int) -> bool:
        """Whether `replica` may train the step at `position` now."""
        level = self.level(replica)
        return level is None or position - level <= self.bound

    def leave(self, replica: int) -> None:
        self.clocks.pop(replica, None)
        self.offsets.pop(replica, None)

    def release(self) -> None:
        self.released = True


class StalenessBound:
    """Replica `replica`'s side of the bound, over `clocks`: a client with `report(replica,
    position)` and `wait(replica, position)` (a report too, answered once the replica may go
    on), each returning a pending `level` (`distributed.pending`).

    `after(position)` after each step reports it without waiting for the answer;
    `before(position, metrics)` before each step waits while the replica is too far ahead,
    adding the seconds to metrics["bound_wait_s"]. It asks the table only when the newest
    level it has read says it must wait, or it has read none since it joined: a level never
    falls while the replica stays, so an old one errs on the side of asking. One report's
    answer is kept until it arrives (later ones are not read), so that however long the round
    trip, levels keep coming in."""

    def __init__(self, replica: int, bound: int, clocks):
        self.replica, self.bound, self.clocks = replica, bound, clocks
        self.known: float | None = None
        self.answer = None  # the pending level being waited for
        self.reported = False  # whether it has joined the clocks

    def before(self, position: int, metrics: dict) -> None:
        if self.answer is not None and self.answer.done():
            self._learn(self.answer.result())
            self.answer = None
        if not self.reported:  # its first step: it joins (level with the slowest) after it
            return
        if self.known is not None and position - self.known <= self.bound:
            return
        start = time.perf_counter()
        self._learn(self.clocks.wait(self.replica, position).result())
        metrics["bound_wait_s"] += time.perf_counter() - start

    def _learn(self, level: float | None) -> None:
        if level is not None:
            self.known = level if self.known is None else max(self.known, level)

    def after(self, position: int) -> None:
        pending = self.clocks.report(self.replica, position)
        self.reported = True
        if self.answer is None:
            self.answer = pending

    def forget(self) -> None:
        """The replica's chunk failed: the driver made it leave, so what it knew is void."""
        self.known, self.answer, self.reported = None, None, False
