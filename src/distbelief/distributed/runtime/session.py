"""What a distributed driver holds besides its scheme's logic: a Ray session (joined, or started
here and stopped at the end), the snapshot keeper, the shards' placement group and the actors,
all released at the end whatever happens."""

from __future__ import annotations

import contextlib
import uuid

from distbelief.distributed.runtime.cluster import kill, remove_placement, shard_placement
from distbelief.distributed.runtime.snapshots import start_keeper
from distbelief.distributed.runtime.startup import check_reachable, ray_session


class DriverSession:
    """`address` joins a Ray cluster (checked now: one that does not answer within
    `connect_timeout_s` fails before anything is written); without it `start()` starts a local
    Ray, which `close()` stops. Actor names carry the session's id, so that runs on one cluster
    never meet."""

    def __init__(self, address: str | None = None, dashboard: bool = False,
                 connect_timeout_s: float = 10.0):
        if address:
            check_reachable(address, connect_timeout_s)
        self.address, self.dashboard = address, dashboard
        self.connect_timeout_s = connect_timeout_s
        self.id = uuid.uuid4().hex[:12]
        self.keeper_name = f"distbelief-{self.id}-keeper"
        self.keeper = self.group = None
        self.shards: list = []
        self.replicas: list = []
        self.stages: list = []  # partitioned replicas' partition actors
        self.others: list = []  # a scheme's other actors (Downpour's clocks)
        self._exit = contextlib.ExitStack()

    def name(self, what: str) -> str:
        return f"distbelief-{self.id}-{what}"

    def start(self) -> None:
        """Ray, and the snapshot keeper on this node."""
        self._exit.enter_context(ray_session(self.address, self.dashboard,
                                                 self.connect_timeout_s))
        self.keeper = start_keeper(self.keeper_name)

    def place_shards(self, count: int) -> list:
        """Scheduling strategies spreading `count` shards over the nodes."""
        self.group, strategies = shard_placement(count)
        return strategies

    def close(self) -> None:
        kill(self.replicas + self.stages + self.shards + self.others +
             ([self.keeper] if self.keeper else []))
        self.replicas, self.stages, self.shards, self.others, self.keeper = [], [], [], [], None
        if self.group is not None:
            remove_placement(self.group)
            self.group = None
        self._exit.close()
