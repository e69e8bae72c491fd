"""Replay of a recorded Downpour run (--record-order; `distbelief replay RUN_DIR`). No Ray.

Under --record-order every shard keeps, in the order it did them, the pulls it served (which
replica process asked, and which of its requests), the pushes it applied (the same, with the
push's trace: for each step it holds, the step and the request whose parameters the step
computed on) and the replicas it retired. The list is part of the shard's snapshot, so every
checkpoint generation holds the history that led to its shards' state, however the run got
there (restarted replicas, a resume, the replicas' timing).

`Replay` re-executes that history in one process. The shards (`ParameterShard`, from the run's
initial values) serve pulls and apply pushes in each one's recorded order; every replica
process of the run (an *incarnation*: a restarted replica is a new one) is a real
`DownpourReplica` that trains its recorded steps and installs each fetch at the step it did.
Gradients are recomputed, not stored. A replica's numbers depend only on what it installed
and a shard's only on its order, so any execution that respects both reproduces the run; on
the CPU with --deterministic and as many threads as the run's replicas had, bit for bit.
Timing is gone: replicas never wait here, and the shards' answers are not counted.

Refused with one line: a history that does not start from the run's initial values (recording
switched on at a resume), a fetch served from a shard state that a shard restart lost,
partitioned replicas.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from distbelief.data import build_data
from distbelief.distributed.downpour.generation import (DIVERGED, STATE, load_snapshot,
                                                        snapshot_name)
from distbelief.distributed.downpour.layout import plain_layout
from distbelief.distributed.downpour.replica import DownpourReplica, FetchWait
from distbelief.distributed.downpour.shard import local_shards
from distbelief.distributed.flat import all_finite
from distbelief.distributed.pending import Done
from distbelief.distributed.wire import wire_dtype
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.engine.rundir import RunDir
from distbelief.engine.setup import set_determinism
from distbelief.errors import CheckpointError, DistbeliefError


class ReplayError(DistbeliefError):
    """A recorded history that cannot be re-executed (module doc)."""


@dataclass
class Incarnation:
    """One replica process of the recorded run: its replica index, its name (the
    `Exchange.incarnation`), its steps in the order it trained them as (step, the request
    whose parameters that step computed on), and how many of them the replay has run."""

    replica: int
    name: str
    steps: list[tuple[int, int]] = field(default_factory=list)
    done: int = 0
    model: DownpourReplica | None = None

    def installs(self) -> int | None:
        """The request installed before the next step, or None when it keeps its
        parameters."""
        step = self.steps[self.done]
        if self.done and self.steps[self.done - 1][1] == step[1]:
            return None
        return step[1]


def incarnations(histories: list[list[tuple]]) -> dict[str, Incarnation]:
    """The replica processes that pushed, from the shards' `histories`: each one's steps are
    its pushes' traces in sequence order (a push that reached some shards only is found on
    those)."""
    pushes = {(op[2], op[3]): (op[1], op[4]) for h in histories for op in h if op[0] == "push"}
    out: dict[str, Incarnation] = {}
    for (name, _), (replica, trace) in sorted(pushes.items()):
        out.setdefault(name, Incarnation(replica, name)).steps.extend(map(tuple, trace))
    return out


class _Fetch:
    """A recorded fetch: there exactly at the step the run installed it."""

    def __init__(self, replay: "Replay", name: str, sequence: int):
        self.replay, self.key = replay, (name, sequence)

    def done(self) -> bool:
        return self.replay.installing.get(self.key[0]) == self.key[1]

    def result(self):
        if not self.done():
            raise ReplayError(f"replica process {self.key[0][:8]} takes fetch {self.key[1]} at "
                              f"a step the record does not install it at")
        return self.replay.take(self.key)


class _PushPull:
    """A push that brings a fetch back: the replies now, the fetch when it is installed."""

    def __init__(self, replies: list, fetch: _Fetch):
        self.replies, self.fetch = replies, fetch

    def done(self) -> bool:
        return self.fetch.done()

    def result(self):
        return self

    def __getitem__(self, i: int):
        return self.replies if i == 0 else self.fetch.result()


class _Client:
    """A replica's server client in the replay: pushes wait for their shards' turn; fetches
    are the values the shards' recorded pulls gave."""

    def __init__(self, replay: "Replay"):
        self.replay = replay

    def fetch(self, source) -> _Fetch:
        return _Fetch(self.replay, source[1], source[2])

    def push(self, vector: torch.Tensor, base_versions: list[int], steps: int, errors,
             pull: bool = False, source=None):
        # A copy: the replica reuses the push's memory.
        self.replay.pushed[source[1], source[2]] = (vector.clone(), list(base_versions), steps,
                                                    tuple(errors), source)
        replies = [{"accepted": True}] * len(base_versions)
        return _PushPull(replies, self.fetch(source)) if pull else Done(replies)


class Replay:
    """Re-executes the shards' `histories` (module doc) for `config`'s run over `data`:
    `run(until)` returns how far it got; `vector()` is the server's values then.

    Raises:
        ReplayError: a history that does not start at version 0 (`bases`), a fetch whose pull
            is not recorded, partitioned replicas.
    """

    def __init__(self, config, data, histories: list[list[tuple]], bases: list[int]):
        if config.cluster.partitions > 1:
            raise ReplayError("replay re-executes whole replicas: this run was partitioned")
        if any(bases):
            raise ReplayError("the recorded history starts at a checkpoint, not at the run's "
                              "initial values (--record-order was switched on at a resume)")
        self.config, self.data, self.histories = config, data, histories
        initial, slots, retention = plain_layout(config, data)
        self.shards = local_shards(config, initial, slots, retention)
        self.dtype = wire_dtype(config)
        self.positions = [0] * len(self.shards)
        self.incarnations = incarnations(histories)
        self.waiting = Counter((op[2], op[3]) for h in histories for op in h if op[0] == "push")
        self.served: dict[tuple, list] = {}  # request -> each shard's pulled (values, version)
        self.pushed: dict[tuple, tuple] = {}  # request -> what the replica pushed
        self.installing: dict[str, int | None] = {}  # incarnation -> request it installs now
        self.diverged_at: int | None = None

    def take(self, key: tuple) -> tuple[torch.Tensor, list[int]]:
        pulled = self.served.pop(key, None)
        if pulled is None or any(p is None for p in pulled):
            raise ReplayError(f"fetch {key[1]} of replica process {key[0][:8]} is not in every "
                              f"shard's record (served by a shard state that a restart lost)")
        return torch.cat([values for values, _ in pulled]), [v for _, v in pulled]

    def run(self, until: int | None = None) -> dict:
        """Re-execute up to where every shard has received `until` minibatches (None: the
        whole history), or the server's values stop being finite. Returns {"minibatches",
        "pushes", "incarnations", "diverged_at"}.

        Raises:
            ReplayError: the history cannot go on (a push or fetch nobody makes)."""
        while self._advance_shards(until) | self._advance_replicas():
            pass
        left = [k for k, h in enumerate(self.histories)
                if self.positions[k] < len(h) and not self._stopped(k, until)]
        if left and self.diverged_at is None:
            k = left[0]
            raise ReplayError(f"the record cannot be re-executed: shard {k} waits at entry "
                              f"{self.positions[k]} ({self.histories[k][self.positions[k]][0]})"
                              f" for what no replica process does")
        return {"minibatches": min(s.steps for s in self.shards),
                "pushes": sum(s.version for s in self.shards),
                "incarnations": len(self.incarnations), "diverged_at": self.diverged_at}

    def vector(self) -> torch.Tensor:
        return torch.cat([s.w for s in self.shards])

    def _stopped(self, k: int, until: int | None) -> bool:
        return self.diverged_at is not None or (until is not None and
                                                self.shards[k].steps >= until)

    def _advance_shards(self, until: int | None) -> bool:
        moved = False
        for k, history in enumerate(self.histories):
            while self.positions[k] < len(history) and not self._stopped(k, until) and \
                    self._apply(k, history[self.positions[k]]):
                self.positions[k] += 1
                moved = True
        return moved

    def _apply(self, k: int, op: tuple) -> bool:
        """Shard k does `op` if it can now (a push waits for its replica)."""
        shard = self.shards[k]
        if op[0] == "pull":
            key = (op[2], op[3])
            self.served.setdefault(key, [None] * len(self.shards))[k] = shard.pull(
                source=op[1:4], dtype=self.dtype)
        elif op[0] == "push":
            key = (op[2], op[3])
            if key not in self.pushed:
                return False
            vector, versions, steps, errors, source = self.pushed[key]
            shard.push(vector[shard.lo:shard.hi], versions[k], steps, errors, source)
            self.waiting[key] -= 1
            if not self.waiting[key]:
                del self.pushed[key]
            if not all_finite(shard.w):
                self.diverged_at = shard.steps
        else:  # "retire"
            shard.retire(op[1])
        return True

    def _advance_replicas(self) -> bool:
        moved = False
        for inc in self.incarnations.values():
            while inc.done < len(inc.steps) and self.diverged_at is None:
                request = inc.installs()
                pulled = self.served.get((inc.name, request))
                if request is not None and (pulled is None or any(p is None for p in pulled)):
                    break  # its parameters are not served yet
                self._step(inc, request)
                moved = True
            if inc.done == len(inc.steps) and inc.model is not None:
                inc.model.drain()  # a last push the run made at its end
                inc.model = None
        return moved

    def _step(self, inc: Incarnation, request: int | None) -> None:
        if inc.model is None:
            inc.model = DownpourReplica(inc.replica, self.config, _Client(self),
                                        stats=self.data.stats, device=torch.device("cpu"))
            inc.model.exchange.incarnation = inc.name
            inc.model.exchange.wait = FetchWait(0.0)  # installs are the record's, not timed
            inc.model.delay = 0.0
        self.installing[inc.name] = request
        step = inc.steps[inc.done][0]
        metrics = inc.model.run(step, 1)
        self.installing[inc.name] = None
        inc.done += 1
        if metrics.get("diverged"):
            self.diverged_at = min(s.steps for s in self.shards)


def replay_run(path, until: int | None = None) -> tuple[Replay, dict]:
    """Replay the run in folder `path` up to `until` minibatches (None: all of them),
    computing with the threads its replicas had: from the histories its shards left when it
    diverged (`generation.DIVERGED`), else from its newest checkpoint's. Returns the `Replay`
    and a report: `Replay.run`'s, with "threads", "source" ("checkpoint" or "diverged"),
    "recorded_minibatches" and, for a whole replay of a checkpoint, "equal" (every shard's
    values, version and minibatches equal the checkpoint's, bit for bit) and
    "max_abs_diff".

    Raises:
        ConfigError: `path` holds no run. CheckpointError: it has no checkpoint, or one
            without histories (not run with --record-order). ReplayError: as `Replay`."""
    run = RunDir(path)
    config = run.read_config()
    if config.mode != "downpour" or not config.downpour.record_order:
        raise CheckpointError(f"{run.path} was not run with --mode downpour --record-order: "
                              f"there is no order to replay")
    recorded = _recorded(run, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(recorded["threads"] or threads)
    try:
        set_determinism(config.deterministic, torch.device("cpu"))
        data = build_data(config, torch.device("cpu"), stats=recorded["stats"])
        replay = Replay(config, data, recorded["histories"], recorded["bases"])
        report = replay.run(until)
    finally:
        torch.set_num_threads(threads)
    report.update(threads=recorded["threads"] or threads, source=recorded["source"],
                  recorded_minibatches=recorded["minibatches"])
    if until is None and recorded["snapshots"] is not None:
        report.update(_compare(replay, recorded["snapshots"]))
    return replay, report


def _recorded(run: RunDir, config) -> dict:
    """What `replay_run` replays: the histories, their bases, the data statistics, the
    replicas' threads, the minibatches recorded, the source and the shards' snapshots (None
    for a divergence's histories, which hold no values)."""
    diverged = run.path / DIVERGED
    if diverged.is_file():
        record = load_checkpoint(diverged)
        return {"histories": [[tuple(op) for op in h] for h in record["histories"]],
                "bases": record["bases"], "stats": record["data_stats"],
                "threads": record["replica_threads"], "minibatches": record["steps"],
                "source": "diverged", "snapshots": None}
    if run.generation() is None:
        raise CheckpointError(f"{run.path} has no checkpoint yet: nothing recorded to replay")
    state = load_checkpoint(run.state_file(STATE))
    snapshots = [load_snapshot(run, k) for k in range(config.cluster.ps_shards)]
    if any("history" not in snap for snap in snapshots):
        missing = [snapshot_name(k) for k, snap in enumerate(snapshots) if "history" not in snap]
        raise CheckpointError(f"{', '.join(missing)} of {run.path} hold no history")
    return {"histories": [[tuple(op) for op in snap["history"]] for snap in snapshots],
            "bases": [snap.get("history_base", 0) for snap in snapshots],
            "stats": state["data_stats"], "threads": state.get("replica_threads"),
            "minibatches": min(snap["steps"] for snap in snapshots), "source": "checkpoint",
            "snapshots": snapshots}


def _compare(replay: Replay, snapshots: list[dict]) -> dict:
    """Whether the replayed shards end where the recorded ones did, bit for bit."""
    equal, diff = True, 0.0
    for shard, snap in zip(replay.shards, snapshots):
        recorded = torch.as_tensor(snap["w"])
        equal &= (shard.version, shard.steps) == (snap["version"], snap["steps"]) and \
            torch.equal(shard.w, recorded)
        diff = max(diff, float((shard.w - recorded).abs().max()))
    return {"equal": bool(equal), "max_abs_diff": diff}


def write_model(replay: Replay, path, minibatches: int) -> None:
    """The replayed server's model as a checkpoint at `path` (for `distbelief eval` and
    `distbelief.load`; written atomically, never over an existing file).

    Raises:
        StorageError: `path` exists, or cannot be written."""
    from distbelief.distributed.server_model import ServerModel
    from distbelief.engine.checkpoint import save_checkpoint
    from distbelief.errors import StorageError

    if os.path.exists(path):
        raise StorageError(f"{path} exists: replay never overwrites a file")
    server = ServerModel(replay.config, replay.data, torch.device("cpu"))
    save_checkpoint(path, server.checkpoint(replay.vector(), minibatches, 0.0, "downpour"))
