"""Sandblaster's parameter-server shard: its slices of the L-BFGS vectors and the round's
gradient accumulator, which adds each portion exactly once. No Ray here."""

from __future__ import annotations

import numpy as np
import torch

from distbelief.distributed.pending import Done
from distbelief.errors import CheckpointError
from distbelief.optim import shard_bounds
from distbelief.optim.lbfgs import REDUCE, VectorSlots

SHARD_REDUCE = {**REDUCE, "held": min}  # ("held",): portions held this round, fewest over shards
WRITES = ("set", "copy", "scale", "axpy", "lincomb", "zero")  # commands that write their dst


def snapshot_name(k: int) -> str:
    return f"vectors-{k}"  # checkpoints/vectors-K.pt


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
        self.dirty: set[str] = set()  # vectors written since the last snapshot

    def apply(self, command: tuple):
        self.commands += 1
        if command[0] in WRITES:
            self.dirty.add(command[1])
        elif command[0] == "free":
            self.dirty.discard(command[1])
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

    def snapshot(self, iteration: int, delta: bool = False) -> dict:
        """This shard's vectors (not the round's accumulator) at the start of L-BFGS iteration
        `iteration`, as numpy views of them: serialize it (an actor's reply or argument) before
        the next command changes them. With `delta`, only those written since the last delta
        ("names" lists them all: `keeper.SnapshotKeeper` merges the rest from the one it holds).
        Its "order" is the iteration."""
        names = [n for n in self.slots if n != "acc"]
        chosen = names
        if delta:  # only deltas go to the keeper: what it lacks is what was written since
            chosen, self.dirty = [n for n in names if n in self.dirty], set()
        return {"index": self.index, "lo": self.lo, "hi": self.hi, "order": iteration,
                "iteration": iteration, "names": names, "delta": delta,
                "slots": {n: self.slots[n].numpy() for n in chosen}}

    def restore(self, state: dict) -> int:
        """Continue from a snapshot of this same slice (numpy arrays or tensors); returns the
        iteration it was taken at.

        Raises:
            CheckpointError: it holds another slice."""
        if (state["index"], state["lo"], state["hi"]) != (self.index, self.lo, self.hi):
            raise CheckpointError(f"the snapshot holds elements [{state['lo']}, {state['hi']}) of "
                                  f"shard {state['index']}, not [{self.lo}, {self.hi}) of "
                                  f"shard {self.index}")
        self.slots = {n: _tensor(v) for n, v in state["slots"].items()}
        self.pool, self.round, self.held = [], -1, set()
        self.dirty = set(self.slots)  # the keeper may not hold these yet: send them all
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
        return Done([s.push(round_, portions, vector[s.lo:s.hi], solo) for s in self.shards])


def _tensor(value) -> torch.Tensor:
    """A tensor of our own from a numpy array (possibly read-only) or a tensor."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    return value.detach().clone()
