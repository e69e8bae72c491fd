"""Which images each L-BFGS batch and portion holds, and which replica computes which portion
next (`PortionQueue`). No Ray here."""

from __future__ import annotations

import time
from collections import deque

import torch

from distbelief.data.augment import epoch_permutation
from distbelief.optim import shard_bounds


def batch_indices(train_size: int, batch_size: int, seed: int, batch: int) -> torch.Tensor:
    """Training images of L-BFGS batch number `batch`.

    A batch size of 0 (or at least the split's size) is the whole split, every time: full-batch
    L-BFGS on one fixed objective. Otherwise the split is shuffled once per epoch (the same
    seeded permutation as the SGD trainers) and cut into consecutive batches; batch k of the
    run is the k-th such batch, and each L-BFGS iteration uses one batch (see
    `coordinator.SandblasterObjective.advance`). No augmentation: f is a deterministic function
    of x.
    """
    if batch_size == 0 or batch_size >= train_size:
        return torch.arange(train_size)
    per_epoch = train_size // batch_size
    epoch, k = divmod(batch, per_epoch)
    return epoch_permutation(train_size, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def portion_indices(batch: torch.Tensor, portions: int, portion: int) -> torch.Tensor:
    """Portion `portion` of `portions` of a batch: contiguous, sizes differing by at most one."""
    lo, hi = shard_bounds(len(batch), portions)[portion]
    return batch[lo:hi]


class PortionQueue:
    """One round's portions: which replica computes what next, and which result wins.

    `take(r)` hands replica r the next portion nobody has started; when there is none and backup
    tasks are on, a copy of the portion running longest elsewhere (each portion gets at most one
    backup). `finished(r, p)` is True for the first result of p and False for every later one
    (wasted). A failed replica's running portions go back to the queue; `missing(ps)` puts won
    portions whose gradients never reached the shards back, to be pushed solo.
    """

    def __init__(self, portions: int, backup: bool = True, clock=time.monotonic):
        self.portions, self.backup, self.clock = portions, backup, clock
        self.todo: deque[int] = deque(range(portions))
        self.running: dict[int, dict[int, float]] = {}  # portion -> {replica: start time}
        self.won: dict[int, int] = {}  # portion -> the replica whose result counts
        self.solo: set[int] = set()
        self.backed_up: set[int] = set()
        self.backups = 0  # backup copies handed out
        self.wasted = 0  # results that lost (late duplicates)

    @property
    def done(self) -> bool:
        return len(self.won) == self.portions

    def take(self, r: int) -> tuple[int, bool] | None:
        """(portion, solo) for replica r, or None when there is nothing for it to do."""
        if self.todo:
            p = self.todo.popleft()
        elif self.backup:
            candidates = [(min(who.values()), p) for p, who in self.running.items()
                          if p not in self.won and p not in self.backed_up and r not in who]
            if not candidates:
                return None
            p = min(candidates)[1]
            self.backed_up.add(p)
            self.backups += 1
        else:
            return None
        self.running.setdefault(p, {})[r] = self.clock()
        return p, p in self.solo

    def finished(self, r: int, p: int) -> bool:
        """Replica r's result for p arrived: True if it is the first (it counts)."""
        who = self.running.get(p, {})
        who.pop(r, None)
        if not who:
            self.running.pop(p, None)
        if p in self.won:
            self.wasted += 1
            return False
        self.won[p] = r
        return True

    def failed(self, r: int) -> None:
        """Replica r died: the portions it was running and nobody else runs are queued again."""
        for p in [p for p, who in self.running.items() if r in who]:
            del self.running[p][r]
            if not self.running[p]:
                del self.running[p]
                if p not in self.won:
                    self.todo.appendleft(p)

    def missing(self, portions) -> None:
        """Won portions that no shard (or not every shard) received: compute them again, solo."""
        for p in sorted(portions):
            self.won.pop(p, None)
            self.solo.add(p)
            self.backed_up.discard(p)
            if p not in self.running and p not in self.todo:
                self.todo.append(p)


class Verdicts:
    """The coordinator's verdict on each replica's last result, (round, portion, won), sent with
    the replica's next call. A verdict is sent again until a newer one exists: a flush can
    overtake the compute call that carried it (they run on different threads of the replica),
    and applying a verdict twice does nothing."""

    def __init__(self):
        self.unresolved: dict[int, tuple] = {}
        self.sent: dict[int, tuple] = {}

    def decided(self, r: int, verdict: tuple) -> None:
        self.unresolved[r] = verdict

    def next(self, r: int) -> tuple | None:
        """The verdict to send with replica r's next call."""
        if r in self.unresolved:
            self.sent[r] = self.unresolved.pop(r)
        return self.sent.get(r)

    def forget(self, r: int) -> None:
        """Replica r died: what it held is gone, and so are its verdicts."""
        self.unresolved.pop(r, None)
        self.sent.pop(r, None)
