"""One batch gradient on the replicas: the coordinator's side of a Sandblaster round.

The batch is cut into many portions, handed to replicas one at a time (`PortionQueue`); each
result's verdict (won or not) travels with the replica's next call (`Verdicts`); at the end
every replica pushes what it won (`flush`), and portions that some shard lacks (their winner
died before pushing) are computed again, each pushed alone. Calls go through
`runtime.calls.ReplicaCalls`, so a replica's death is one failure and its portions go back to the
queue. See `distributed.sandblaster` for why every portion counts exactly once.
"""

from __future__ import annotations

import math
from collections import Counter

from distbelief.distributed.runtime.calls import ReplicaCalls, ShardLost
from distbelief.distributed.sandblaster.actors import SHARD_LOST
from distbelief.distributed.sandblaster.portions import PortionQueue, Verdicts
from distbelief.engine.lifecycle import Diverged
from distbelief.errors import DistbeliefError

POLL_S = 0.5


class BatchGradient:
    """`gradient(round, batch)` has the replicas add the batch's summed gradient into the
    shards' "acc" and returns the summed loss. `counters` (the run's) get portions_computed,
    portions_recomputed, backup_tasks and backup_wasted; `won` counts each replica's winning
    portions over the run, `won_now` since `won_now` was last reset."""

    def __init__(self, config, replicas: list, store, book, counters: Counter, position):
        self.config, self.replicas, self.store = config.sandblaster, replicas, store
        self.counters, self.position = counters, position
        self.calls = ReplicaCalls(replicas, book, lost=SHARD_LOST, position=position,
                                  on_failure=self._failed, on_error=self._error)
        self.verdicts = Verdicts()
        self.queue: PortionQueue | None = None
        self.round = None
        self.won, self.won_now = Counter(), Counter()

    def __call__(self, round_: int, batch: int) -> float:
        self.round = round_
        self.queue = queue = PortionQueue(self.config.portions, self.config.backup_tasks)
        losses: dict[int, float] = {}
        self._offer(round_, batch)
        while True:
            if queue.done:
                missing = self._collect(round_)
                if not missing:
                    break
                self.counters["portions_recomputed"] += len(missing)
                queue.missing(missing)
                for p in missing:
                    losses.pop(p, None)
            elif self.calls.empty:
                raise DistbeliefError("no replica is left to compute the batch")
            else:
                for r, tag, result in self.calls.wait(POLL_S):
                    self._result(r, tag, result, round_, losses)
            self._offer(round_, batch)
        self.counters["backup_tasks"] += queue.backups
        return math.fsum(losses.values())

    def _offer(self, round_: int, batch: int) -> None:
        busy = self.calls.busy()
        for r in range(len(self.replicas)):
            if r in busy or not self.calls.ready(r):
                continue
            job = self.queue.take(r)
            if job is not None:
                p, solo = job
                self.calls.submit(r, "compute", round_, batch, p, solo, self.verdicts.next(r),
                                  tag=("compute", round_, p))

    def _result(self, r: int, tag: tuple, result: dict, round_: int, losses: dict) -> None:
        kind, rnd, p = tag
        if kind != "compute":
            return
        self.counters["portions_computed"] += 1
        win = False
        if rnd != round_:  # a copy from an earlier round, still running when it ended
            self.counters["backup_wasted"] += 1
        else:
            wasted_before = self.queue.wasted
            win = self.queue.finished(r, p)
            self.counters["backup_wasted"] += self.queue.wasted - wasted_before
            if win:
                losses[p] = result["loss_sum"]
                self.won[r] += 1
                self.won_now[r] += 1
        self.verdicts.decided(r, (rnd, p, win))
        if not math.isfinite(result["loss_sum"]):
            raise Diverged(f"the loss is not finite (replica {r}, iteration {self.position()}); "
                           f"lower --lr or use --line-search strong_wolfe (the last checkpoint "
                           f"is kept)")

    def _error(self, r: int, tag: tuple, error: BaseException) -> None:
        """A call raised: a shard lost during an earlier round (one the coordinator gave up and
        repeats) is that round's business, not this one's; anything else is raised."""
        if isinstance(error, ShardLost) and tag[1] != self.round:
            self.counters["backup_wasted"] += 1
            return
        raise error

    def _failed(self, r: int, tags: list, restarted: bool) -> None:
        """Replica r died: its verdicts are void, its running portions go back to the queue,
        and those it won but had not pushed are found missing at the end of the round."""
        self.verdicts.forget(r)
        if self.queue is not None:
            self.queue.failed(r)

    def _collect(self, round_: int) -> set[int]:
        """Every live replica pushes what it holds of `round_`; returns the portions some shard
        lacks (their winners died before pushing them). Compute results that arrive meanwhile
        (backup copies) are taken as usual."""
        for r in range(len(self.replicas)):
            if self.calls.ready(r):
                self.calls.submit(r, "flush", round_, self.verdicts.next(r),
                                  tag=("flush", round_, r))
        while any(tag[0] == "flush" for _, tag in self.calls.inflight.values()):
            for r, tag, result in self.calls.wait(POLL_S):
                self._result(r, tag, result, round_, {})
        if self.store.run([("held",)])[0] == self.config.portions:
            return set()
        everything = set(range(self.config.portions))
        return set().union(*(everything - set(st["held"])
                             for st in self.store.call("stats")))
