"""Where a synchronous run's workers and its driver meet. Plain Python: no Ray here
(`sync.actors.HubActor` holds one in a Ray actor, which Ray restarts if it dies).

Rank 0 puts events: ``{"kind": "attempt", "iteration", "records"}`` (the worker group
started, or Ray Train restarted it after a loss, from the checkpoint at `iteration`, which
holds the run's training records up to it), ``{"kind": "train",
"record": ...}`` (a training record, every --log-every steps), ``{"kind": "state",
"iteration", "state", "evaluate", "checkpoint"}`` (the model and optimizer state when the
driver is to evaluate or checkpoint), ``{"kind": "diverged", ...}``. The driver takes them in
order and passes a stop request on.

The hub holds no state a run needs to continue: what restarts continue from is Ray Train's
checkpoint (`sync.worker`). A hub that dies and is restarted loses only the events it held
that the driver had not taken yet (the driver takes them as they come) and a stop request,
which the driver repeats.
"""

from __future__ import annotations

from collections import deque


class SyncHub:
    """The events of one run and the stop request."""

    def __init__(self):
        self.events: deque = deque()
        self.stop = False
        self.workers: dict[int, int] = {}  # rank -> process id, of the current workers

    def joined(self, rank: int, pid: int) -> None:
        """A worker started (`rank`, its process id)."""
        self.workers[rank] = pid

    def put(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        """Every event since the last call, oldest first."""
        out = list(self.events)
        self.events.clear()
        return out

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def status(self) -> dict:
        return {"workers": dict(self.workers), "events": len(self.events)}
