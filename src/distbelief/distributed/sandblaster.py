"""Sandblaster L-BFGS (Dean et al., 2012, Sec. 4.2): the pieces without Ray.

The coordinator (the driver) runs `optim.lbfgs.LBFGS` over a store whose vectors live on the
parameter-server shards, each shard holding its slice of every vector (`VectorShard`); it never
holds a parameter vector. Each objective evaluation is one *round*:

1. the coordinator tells the shards the round number; they zero their gradient accumulator;
2. the batch is cut into many portions (`--portions`, far more than replicas); a replica gets
   one portion at a time (`PortionQueue`), so fast replicas do more. At its first portion of
   the round a replica fetches the parameters "x"; it reports each portion's loss to the
   coordinator and keeps its gradient until the coordinator's verdict (below), and it pushes
   the sum of its winning portions' gradients to the shards every `push_every` portions;
3. backup tasks: when no portion is left to hand out, idle replicas get copies of portions still
   running elsewhere; the first result reported wins and the others are discarded;
4. at the end the coordinator has every replica push what it holds (`flush`), checks that every
   shard holds every portion, and finishes the gradient on the shards:
   g = acc / batch + weight_decay * x.

Exactly once. The coordinator decides which copy of a portion wins when its result arrives, and
sends the verdict with its next call to that replica; only winners enter a replica's
accumulator. Each push names its portions; a shard adds a push only if it holds none of them
(`VectorShard.push`), so nothing is added twice even when a dead replica's push arrives late.
When a replica dies, the portions it won but had not pushed are found missing on the shards at
the end of the round and computed again, each pushed on its own ("solo"), so that a shard that
had received it already just skips it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F

from distbelief.data import build_data
from distbelief.data.augment import epoch_permutation
from distbelief.distributed.shard import FlatModel
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.trainer import build_model
from distbelief.errors import CheckpointError
from distbelief.optim import shard_bounds
from distbelief.optim.lbfgs import REDUCE, VectorSlots

SHARD_REDUCE = {**REDUCE, "held": min}  # ("held",): portions held this round, fewest over shards


def batch_indices(train_size: int, batch_size: int, seed: int, batch: int) -> torch.Tensor:
    """Training images of L-BFGS batch number `batch`.

    A batch size of 0 (or at least the split's size) is the whole split, every time: full-batch
    L-BFGS on one fixed objective. Otherwise the split is shuffled once per epoch (the same
    seeded permutation as the SGD trainers) and cut into consecutive batches; batch k of the
    run is the k-th such batch, and each L-BFGS iteration uses one batch (see
    `SandblasterObjective.advance`). No augmentation: f is a deterministic function of x.
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


class VectorShard(VectorSlots):
    """Shard k's slices [lo, hi) of the L-BFGS vectors, and the round's gradient accumulator
    "acc" with the set of portions it holds. Extra commands:

        ("round", r, like)   start round r: acc = zeros like `like`, no portion held
        ("held",) -> int     portions held this round (the store takes the minimum over shards)
    """

    reduce = SHARD_REDUCE

    def __init__(self, index: int, lo: int, hi: int):
        super().__init__()
        self.index, self.lo, self.hi = index, lo, hi
        self.round = -1
        self.held: set[int] = set()
        self.counts = {"added": 0, "duplicate": 0, "rejected": 0, "stale": 0}
        self.commands = 0

    def apply(self, command: tuple):
        self.commands += 1
        if command[0] == "round":
            _, self.round, like = command
            super().apply(("zero", "acc", like))
            self.held = set()
            return None
        if command[0] == "held":
            return len(self.held)
        return super().apply(command)

    def push(self, round_: int, portions: list[int], update: torch.Tensor, solo: bool) -> str:
        """Add the gradient sum of `portions` computed in round `round_`. Returns "added",
        "duplicate" (a solo push of a portion held already: skipped), "rejected" (a push of
        several portions some of which are held: only a dead replica's late push can be one;
        nothing is added) or "stale" (another round's)."""
        if round_ != self.round:
            outcome = "stale"
        elif self.held.isdisjoint(portions):
            self.slots["acc"].add_(update)
            self.held.update(portions)
            outcome = "added"
        else:
            outcome = "duplicate" if solo and len(portions) == 1 else "rejected"
        self.counts[outcome] += 1
        return outcome

    def pull(self, name: str = "x") -> torch.Tensor:
        return self.slots[name]

    def snapshot(self, path, iteration: int) -> None:
        """Write this shard's vectors (not the round's accumulator) atomically to `path`."""
        save_checkpoint(path, {"index": self.index, "lo": self.lo, "hi": self.hi,
                               "iteration": iteration,
                               "slots": {k: v for k, v in self.slots.items() if k != "acc"}})

    def restore(self, path) -> int:
        """Load a snapshot of this same slice; returns the iteration it was taken at.

        Raises:
            CheckpointError: the file is unreadable or holds another slice."""
        state = load_checkpoint(path)
        if (state["index"], state["lo"], state["hi"]) != (self.index, self.lo, self.hi):
            raise CheckpointError(f"{path} holds elements [{state['lo']}, {state['hi']}) of "
                                  f"shard {state['index']}, not [{self.lo}, {self.hi}) of "
                                  f"shard {self.index}")
        self.slots = dict(state["slots"])
        return state["iteration"]

    def stats(self) -> dict:
        return {"shard": self.index, "elements": self.hi - self.lo, "round": self.round,
                "held": sorted(self.held), "vectors": len(self.slots),
                "commands": self.commands, **self.counts}


def slice_commands(commands: list[tuple], lo: int, hi: int) -> list[tuple]:
    """The commands as shard [lo, hi) runs them: "set" carries only its slice."""
    return [(c[0], c[1], c[2][lo:hi]) if c[0] == "set" else c for c in commands]


def combine(commands: list[tuple], per_shard: list[list]) -> list[float]:
    """Each reducing command's result over all shards (sum, max or min; see SHARD_REDUCE)."""
    kinds = [c[0] for c in commands if c[0] in SHARD_REDUCE]
    return [SHARD_REDUCE[kind](results) for kind, results in zip(kinds, zip(*per_shard))]


class LocalShards:
    """A store over in-process `VectorShard`s (tests): the same commands as the Ray actors."""

    def __init__(self, size: int, count: int):
        self.bounds = shard_bounds(size, count)
        self.shards = [VectorShard(k, lo, hi) for k, (lo, hi) in enumerate(self.bounds)]

    def run(self, commands: list[tuple]) -> list[float]:
        return combine(commands, [s.execute(slice_commands(commands, s.lo, s.hi))
                                  for s in self.shards])

    def read(self, name: str) -> torch.Tensor:
        return torch.cat([s.pull(name) for s in self.shards])

    # the replicas' client
    def pull(self, name: str = "x") -> torch.Tensor:
        return self.read(name).clone()

    def push(self, round_: int, portions: list[int], vector: torch.Tensor, solo: bool):
        from distbelief.distributed.downpour import Done

        return Done([s.push(round_, portions, vector[s.lo:s.hi], solo) for s in self.shards])


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


class SandblasterReplica:
    """A model replica computing batch portions' gradients at the parameters of the round.

    `compute(round, batch, portion, solo, resolve)` first applies `resolve` = (round, portion,
    won) to the result it still holds (the coordinator's verdict on its previous portion), then
    computes the new portion's summed loss and gradient and keeps the gradient until its own
    verdict arrives. `flush(round, resolve)` applies a verdict and pushes what it holds for the
    round, returning when the shards have it; in the Ray actor it runs on its own thread, so a
    replica busy with a slow portion still flushes at once. `client` offers `pull(name)` and
    `push(round, portions, vector, solo)` (returning a pending call).
    """

    def __init__(self, index: int, config, client, stats: dict | None = None,
                 device: torch.device | str = "cpu", straggler_delay: float = 0.0):
        self.index, self.config, self.client = index, config, client
        self.device = torch.device(device)
        self.straggler_delay = straggler_delay
        data = build_data(config, self.device, stats=stats)
        stream = data.train
        self.images, self.labels, self.mean = stream.images, stream.labels, stream.mean
        self.train_size = data.train_size
        self.dtype = getattr(torch, config.dtype)
        self.model = build_model(config, data, self.device).to(self.dtype)
        self.flat = FlatModel(self.model)
        self.lock = threading.Lock()  # compute and flush threads share the fields below
        self.round = None
        self.pending = None  # (round, portion, gradient, solo) awaiting its verdict
        self.acc, self.acc_portions = None, []
        self.pushes: list[tuple[list[int], object]] = []
        self._batch = (None, None)
        self.computed = 0

    def _indices(self, batch: int, portion: int) -> torch.Tensor:
        if self._batch[0] != batch:
            c = self.config
            self._batch = (batch, batch_indices(self.train_size, c.batch_size, c.seed, batch))
        return portion_indices(self._batch[1], self.config.portions, portion)

    def _resolve(self, resolve) -> None:
        if resolve is None or self.pending is None:
            return
        round_, portion, grad, solo = self.pending
        if (round_, portion) != tuple(resolve[:2]):
            return  # applied already (by flush or compute, whichever ran first)
        self.pending = None
        if not resolve[2] or round_ != self.round:
            return
        if solo:
            self.pushes.append(([portion], self.client.push(round_, [portion], grad, True)))
            return
        self.acc = grad if self.acc is None else self.acc.add_(grad)
        self.acc_portions.append(portion)
        if len(self.acc_portions) >= self.config.push_every:
            self._push_acc()

    def _push_acc(self) -> None:
        if self.acc_portions:
            self.pushes.append((self.acc_portions, self.client.push(
                self.round, self.acc_portions, self.acc, False)))
        self.acc, self.acc_portions = None, []

    def compute(self, round_: int, batch: int, portion: int, solo: bool = False,
                resolve=None) -> dict:
        start = time.perf_counter()
        with self.lock:
            self._resolve(resolve)
            fetch = round_ != self.round
            if fetch:  # a new round: what is left of an older one is stale
                self.round, self.pending, self.acc, self.acc_portions = round_, None, None, []
                self.pushes = []
        if fetch:
            self.flat.load(self.client.pull("x"))
        index = self._indices(batch, portion).to(self.device)
        x = self.images[index].to(self.dtype).div_(255).sub_(self.mean)
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), self.labels[index], reduction="sum")
        loss.backward()
        loss = loss.detach()
        grad = self.flat.gradient(self.dtype).cpu()
        if self.straggler_delay:
            time.sleep(self.straggler_delay)
        with self.lock:
            if self.round == round_:
                self.pending = (round_, portion, grad, solo)
        self.computed += 1
        return {"replica": self.index, "round": round_, "portion": portion,
                "loss_sum": loss.item(), "images": len(index), "fetched": fetch,
                "seconds": time.perf_counter() - start}

    def flush(self, round_: int, resolve=None) -> dict:
        """Push everything won in `round_` and wait for the shards; returns the outcomes."""
        with self.lock:
            self._resolve(resolve)
            if self.round == round_:
                self._push_acc()
            pushes, self.pushes = self.pushes, []
        outcomes = [(portions, pending.result()) for portions, pending in pushes]
        return {"replica": self.index, "round": round_,
                "pushed": [p for portions, result in outcomes
                           if all(o in ("added", "duplicate") for o in result) for p in portions],
                "outcomes": [o for _, result in outcomes for o in result]}


class LocalBatchObjective:
    """The Sandblaster batch objective computed in this process in one pass: the reference the
    distributed version is tested against, usable with `optim.lbfgs.LBFGS` on a `LocalStore`.
    `initial` is the coordinator's starting point for the same config."""

    def __init__(self, config, device: torch.device | str = "cpu"):
        self.config, self.device = config, torch.device(device)
        data = build_data(config, self.device)
        self.images, self.labels, self.mean = data.train.images, data.train.labels, data.train.mean
        self.train_size = data.train_size
        self.full_batch = config.batch_size == 0 or config.batch_size >= self.train_size
        self.dtype = getattr(torch, config.dtype)
        torch.manual_seed(config.seed)
        self.model = build_model(config, data, self.device).to(self.dtype)
        self.flat = FlatModel(self.model)
        self.initial = self.flat.vector(self.dtype)
        self.batch = 0

    def value_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        index = batch_indices(self.train_size, self.config.batch_size, self.config.seed,
                              self.batch).to(self.device)
        self.flat.load(x)
        self.model.zero_grad(set_to_none=True)
        inputs = self.images[index].to(self.dtype).div_(255).sub_(self.mean)
        loss = F.cross_entropy(self.model(inputs), self.labels[index], reduction="sum")
        loss.backward()
        wd, b = self.config.weight_decay, len(index)
        grad = self.flat.gradient(self.dtype).cpu() / b + wd * x
        return l2_objective(loss.item(), b, wd, float(x.dot(x))), grad.cpu()

    def evaluate(self, store, prepare, grad, then):
        store.run(prepare)
        f, g = self.value_and_grad(store.read("x"))
        return f, store.run([("set", grad, g)] + then)

    def advance(self) -> bool:
        if self.full_batch:
            return False
        self.batch += 1
        return True


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def l2_objective(loss_sum: float, batch: int, weight_decay: float, xx: float) -> float:
    """The batch objective: mean cross-entropy plus weight_decay / 2 * |x|^2 (whose gradient is
    the weight_decay * x the SGD trainers add)."""
    return loss_sum / batch + weight_decay / 2 * xx if batch else math.nan
