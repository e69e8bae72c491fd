"""What a distributed driver holds besides its scheme's logic: a Ray session (joined, or started
here and stopped at the end), the actors (killed at the end, whatever happens) and a folder for
their snapshots. Ray itself is `runtime`'s business."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from distbelief.distributed.runtime import check_reachable, kill, ray_session


class DriverSession:
    """`address` joins a Ray cluster (checked now: an unreachable one fails before anything is
    written); without it `start()` starts a local Ray, which `close()` stops."""

    def __init__(self, address: str | None = None, dashboard: bool = False):
        if address:
            check_reachable(address)
        self.address, self.dashboard = address, dashboard
        self.shards: list = []
        self.replicas: list = []
        self._exit = contextlib.ExitStack()

    def start(self) -> None:
        self._exit.enter_context(ray_session(self.address, self.dashboard))

    def folder(self, run) -> Path:
        """Where the actors write their snapshots: the run's checkpoints/, or without a run
        directory a temporary folder that `close()` removes."""
        if run is not None:
            path = run.checkpoints
        else:
            path = Path(self._exit.enter_context(
                tempfile.TemporaryDirectory(prefix="distbelief-snapshots-")))
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()

    def close(self) -> None:
        kill(self.replicas + self.shards)
        self.replicas, self.shards = [], []
        self._exit.close()
