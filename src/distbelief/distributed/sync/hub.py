"""Where a synchronous run's workers and its driver meet. Plain Python: no Ray here
(`sync.actors.HubActor` holds one in a Ray actor).

Rank 0 puts events: ``{"kind": "train", "record": ...}`` (a training record, every --log-every
steps), ``{"kind": "state", "iteration", "state", "evaluate", "checkpoint"}`` (the model and
optimizer state when the driver is to evaluate or checkpoint), ``{"kind": "attempt",
"attempt", "iteration"}`` (the worker group started, or Ray Train restarted it after a loss,
from `iteration`), ``{"kind": "diverged", ...}``. The driver takes them in order.

The hub keeps the state of the latest checkpoint event: a worker group that Ray Train restarts
after a worker died resumes from it (the same state the driver writes to checkpoints/last.pt),
so the steps since the last checkpoint are trained again and nothing else is lost.
"""

from __future__ import annotations

from collections import deque


class SyncHub:
    """The events of one run, the latest checkpointed state and the stop request.

    `state`: the state to start from (a resumed run's checkpoint), None for a new run."""

    def __init__(self, state: dict | None = None):
        self.latest = state
        self.events: deque = deque()
        self.stop = False
        self.attempts = 0
        self.workers: dict[int, int] = {}  # rank -> process id, of the current attempt

    def join(self, rank: int, pid: int) -> dict | None:
        """A worker starts (`rank`, its process id); returns the state to continue from. Rank 0
        starting again means a new attempt: the driver hears of it."""
        self.workers[rank] = pid
        if rank == 0:
            self.attempts += 1
            iteration = 0 if self.latest is None else self.latest["iteration"]
            self.events.append({"kind": "attempt", "attempt": self.attempts,
                                "iteration": iteration})
        return self.latest

    def put(self, event: dict) -> None:
        if event["kind"] == "state" and event["checkpoint"]:
            self.latest = event["state"]
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
        return {"attempts": self.attempts, "workers": dict(self.workers),
                "latest": None if self.latest is None else self.latest["iteration"]}
