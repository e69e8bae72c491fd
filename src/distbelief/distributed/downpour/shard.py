"""Downpour's parameter-server shard: a slice of the server's flat vector (`distributed.flat`)
and the update rule it applies to every push on arrival. Plain Python: no Ray here.

`optim.shard_bounds` cuts the vector into K contiguous slices balanced by size; shard k owns
w[lo:hi).

BatchNorm statistics. The server keeps one moving average over the batches of all replicas: a
push carries, for buffer elements, what the replica's forward passes since its last push make
of it, and the shard folds it in (`statistics.fold`: with --bn-stats batch, the replica's own
moving average of those batches started at zero, r <- (1 - a)^k r + c; with delta, the change
of the replica's running statistics, added). With one replica either is exactly the
single-process trainer's running average; with several, every replica's batches move the
server's average as they arrive, so the model evaluated from the server has statistics computed
on recent parameters and on all replicas' data (`downpour.statistics`).

Exactly once. Ray retries a push that was in flight when a shard died on the restarted shard,
which starts from its latest snapshot: a push the snapshot already holds must not be applied
twice, one it does not hold must be applied. Each push names its source (replica, the replica
process's incarnation, a sequence number that grows with every push); the shard remembers the
last one applied per replica, in its snapshots too, and skips what it has seen.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import torch

from distbelief.distributed.downpour.rules import StaleUpdate
from distbelief.distributed.downpour.statistics import buffer_slice, fold
from distbelief.distributed.flat import all_finite
from distbelief.distributed.wire import tensor_view
from distbelief.engine.schedule import LRSchedule
from distbelief.errors import CheckpointError

STALENESS_CAP = 64  # staleness histogram: larger values are counted under 64


def async_ramp(steps: int, length: int, replicas: int) -> float:
    """--async-warmup's factor of the lr after `steps` minibatches: 1 / replicas rising
    linearly to 1 over the first `length`, then 1 (Goyal et al., 2017's warmup). Under dana a
    round of N pushes moves the server as one synchronous step over its N minibatches would at
    N times the lr (each replica's momentum is one of N terms of that step's momentum), and
    such a step needs the warmup that the single process's lr does not."""
    if steps >= length:
        return 1.0
    return 1 / replicas + (1 - 1 / replicas) * steps / length


def shard_lost(config) -> str:
    """The one line for a shard that is gone for good."""
    return (f"a parameter-server shard is gone (it failed more than --max-restarts "
            f"{config.cluster.max_restarts} times); --resume continues from the last checkpoint")


class ParameterShard:
    """Owns w[lo:hi) of the server vector and applies every push on arrival.

    Gradient elements (those below `n_params`) are updated by the configured rule: SGD with
    momentum, weight decay and the recipe's lr schedule, or Adagrad (per-parameter step
    gamma / sqrt(sum of squared gradients)), with --staleness-rule's correction for the push's
    staleness (`downpour.rules`). Buffer elements fold in what is pushed for them
    (`statistics.fold`); `retention` (of this slice's buffer elements,
    `statistics.buffer_slice`) is required for a slice holding buffers under --bn-stats batch.

    `version` counts applied pushes; a push states the version its gradient was computed
    from, so `version - base_version` is its staleness. `steps` counts the minibatch gradients
    received (a push accumulated over n_push steps adds n_push) and drives the lr schedule, whose
    milestones are therefore in minibatches over all replicas.

    A push holding NaN or Inf is rejected and counted, never applied; its minibatches still
    count in `steps`, so that every shard's lr schedule stays where the others' are (replicas
    check a whole push before sending it, so a refusal by some shards only is a corrupted
    transfer, not a diverged replica). `snapshot()` is the state as plain arrays (a copy, taken
    between pushes), `snapshot_due()` says when `config.downpour.snapshot_every_s` has passed.
    """

    def __init__(self, index: int, lo: int, hi: int, n_params: int, values: torch.Tensor,
                 config, clock=time.monotonic, retention=None, take: bool = False):
        if values.shape != (hi - lo,):
            raise ValueError(f"shard {index} owns [{lo}, {hi}) but got {tuple(values.shape)} "
                             f"values")
        self.index, self.lo, self.hi = index, lo, hi
        self.split = max(0, min(hi, n_params) - lo)  # w[:split] are parameters, the rest buffers
        # Copied, unless the caller gives `values` up (`take`; another dtype is converted).
        self.w = values.detach().float() if take else values.detach().float().clone()
        self.config = config
        # Under --bn-stats batch, the buffers' 1 - momentum (`statistics.server_retention`).
        self.retention = None
        if config.downpour.bn_stats == "batch" and hi > lo + self.split:
            if retention is None or len(retention) != hi - lo - self.split:
                # Folding by addition would silently be the wrong average.
                raise ValueError(f"shard {index} holds {hi - lo - self.split} buffer elements: "
                                 f"--bn-stats batch needs their retention "
                                 f"(statistics.buffer_slice)")
            self.retention = torch.as_tensor(retention, dtype=torch.float32).clone()
        self.rule = config.optimizer
        self.schedule = LRSchedule(config)
        self.update = StaleUpdate(config, self.split, config.cluster.ps_threads)
        self.out: torch.Tensor | None = None  # what pulls return, reused (`pull`)
        self.version = self.steps = self.rejected = self.duplicates = 0
        self.bytes_in = self.bytes_out = 0
        self.staleness: Counter[int] = Counter()
        self.applied: dict[int, tuple[str, int]] = {}  # replica -> (incarnation, last sequence)
        # --record-order: what this shard did, in order (`history`), for `downpour.replay`.
        self.history: list[tuple] | None = [] if config.downpour.record_order else None
        self.history_base = 0  # the version `history` starts from
        self.clock = clock
        self.last_snapshot = clock()
        self.snapshot_version = 0

    # --- the two operations replicas use ---------------------------------------------------

    def pull(self, copy: bool = True, source: int | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
        """(this shard's values, the version they are at). With `copy` False, the live tensor
        or a buffer the next pull of this dtype reuses: read it before the next push (an
        actor's return value is serialized at once, which is the copy). `source`: the replica
        fetching (delay compensation keeps what it got; under rule ``dana`` it gets its
        look-ahead parameters, with the buffers as they are), or (replica, incarnation,
        sequence) naming the fetch, as replicas send it (recorded under --record-order).
        `dtype` other than float32: the values rounded to it."""
        if isinstance(source, (tuple, list)):
            if self.history is not None:
                self.history.append(("pull", *source[:3]))
            source = source[0]
        self.bytes_out += self.w.numel() * torch.finfo(dtype).bits // 8
        self.update.remember(source, self.version, self.w[:self.split])
        ahead = self.update.looks_ahead(source)
        if dtype == torch.float32 and not ahead:
            return (self.w.clone() if copy else self.w), self.version
        out = torch.empty(self.w.shape, dtype=dtype) if copy else self._buffer(dtype)
        w, split = self.w, self.split
        if ahead:  # computed straight into the transfer dtype: one pass, not two
            self.update.ahead(w[:split], self.lr(), out[:split])
            out[split:].copy_(w[split:])
        else:
            self.update.ranges.run(w.numel(), lambda lo, hi: out[lo:hi].copy_(w[lo:hi]))
        return out, self.version

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The reused pull buffer of `dtype` (one at a time: replicas pull in one dtype)."""
        if self.out is None or self.out.dtype != dtype:
            self.out = torch.empty(self.w.shape, dtype=dtype)
        return self.out

    def push(self, update: torch.Tensor, base_version: int, steps: int = 1,
             errors: tuple[float, ...] = (), source: tuple | None = None) -> dict:
        """Apply `update` (gradient for parameter elements, delta for buffer elements),
        accumulated over `steps` minibatches computed from parameters at `base_version`.
        `errors` are those minibatches' training errors (for the error-triggered warmup);
        `source` = (replica, incarnation, sequence[, trace]) makes a repeated push a
        no-op; under --record-order the push and its trace (`replica.Exchange.push`) are
        recorded. `update` may be bfloat16 or float16 (--ps-transfer-dtype): its values are
        used as float32.
        Returns {"accepted", "version", "steps"} (and "duplicate" for a repeat)."""
        self.bytes_in += update.numel() * update.element_size()
        if update.shape != self.w.shape:
            raise ValueError(f"shard {self.index} expects {self.w.numel()} values, "
                             f"got {tuple(update.shape)}")
        if source is not None and self._seen(source):
            self.duplicates += 1
            return {"accepted": True, "duplicate": True, "version": self.version,
                    "steps": self.steps}
        if self.history is not None and source is not None:
            self.history.append(("push", *source[:3], tuple(map(tuple, source[3]))
                                 if len(source) > 3 else ()))
        if not all(self.update.ranges.run(
                update.numel(), lambda lo, hi: all_finite(update[lo:hi]))):
            self.rejected += 1
            self._count(steps, errors)
            return {"accepted": False, "version": self.version, "steps": self.steps}
        staleness = max(self.version - base_version, 0)
        self.staleness[min(staleness, STALENESS_CAP)] += 1
        self._apply(update, staleness, None if source is None else source[0], base_version,
                    steps)
        self._count(steps, errors)
        self.version += 1
        return {"accepted": True, "version": self.version, "steps": self.steps}

    def _seen(self, source: tuple) -> bool:
        """Whether this push was applied already; else it becomes the replica's last one."""
        replica, incarnation, sequence = source[:3]
        held = self.applied.get(replica)
        if held is not None and held[0] == incarnation and sequence <= held[1]:
            return True
        self.applied[replica] = (incarnation, sequence)
        return False

    def _apply(self, update: torch.Tensor, staleness: int, replica: int | None,
               base_version: int, steps: int) -> None:
        self.update.apply(self.w[:self.split], update[:self.split], self.lr(), staleness,
                          replica, base_version)
        fold(self.w[self.split:], update[self.split:].float(), self.retention,
             steps * self.config.cluster.micro_batches)

    def lr(self) -> float:
        """The step size of the next push: the recipe's schedule at the minibatches received
        (times `async_ramp` under --async-warmup), or under --local-steps the constant
        --outer-lr (the replicas' own steps follow the schedule, and a pushed change carries
        their lr). The look-ahead of a fetch takes the same lr as the steps."""
        d = self.config.downpour
        if d.local_steps:
            return d.outer_lr
        lr = self.schedule.lr_at(self.steps)
        if d.async_warmup:
            lr *= async_ramp(self.steps, d.async_warmup, self.config.cluster.replicas)
        return lr

    def retire(self, replica: int) -> bool:
        """Replica `replica` is gone for good (`StaleUpdate.retire`): whether it held state."""
        if self.history is not None:
            self.history.append(("retire", replica))
        return self.update.retire(replica)

    def _count(self, steps: int, errors: tuple[float, ...]) -> None:
        for j, error in enumerate(errors):
            self.schedule.observe(self.steps + j, error)
        self.steps += steps

    # --- snapshots -----------------------------------------------------------------------

    def snapshot(self, out: dict | None = None, live: bool = False) -> dict:
        """The whole state as numpy arrays and plain values, copied now; its "order" is the
        version (what `keeper.SnapshotKeeper` keeps the newest of). With `out` the arrays are
        copied into `out`'s (made there the first time): a fresh 100 MB array costs its page
        faults, several times the copy itself, on every snapshot. With `live` they are not
        copies but the shard's own memory: to be written out before the state changes
        (`keeper.SnapshotFile`)."""
        self.last_snapshot, self.snapshot_version = self.clock(), self.version
        out = {} if out is None else out

        def copy(name: str, t: torch.Tensor | None):
            if t is None or live:
                return None if t is None else t.detach().numpy()
            if name not in out or out[name].shape != tuple(t.shape):
                out[name] = np.empty(tuple(t.shape), dtype=np.float32)
            np.copyto(out[name], t.numpy())
            return out[name]

        return {"index": self.index, "lo": self.lo, "hi": self.hi, "rule": self.rule,
                "order": self.version, "w": copy("w", self.w),
                **self.update.snapshot(copy), "version": self.version, "steps": self.steps,
                "schedule": self.schedule.state_dict(), "rejected": self.rejected,
                "staleness": dict(self.staleness), "applied": dict(self.applied),
                **({} if self.history is None else {"history": list(self.history),
                                                    "history_base": self.history_base})}

    def snapshot_due(self) -> bool:
        return self.clock() - self.last_snapshot >= self.config.downpour.snapshot_every_s

    def restore(self, state: dict) -> int:
        """Continue from a snapshot of this same slice (numpy or torch arrays, as `snapshot`
        gives and checkpoints hold); returns its version.

        Raises:
            CheckpointError: the snapshot is of another slice or update rule."""
        mine = (self.index, self.lo, self.hi, self.rule)
        theirs = (state["index"], state["lo"], state["hi"], state["rule"])
        if mine != theirs:
            raise CheckpointError(f"shard snapshot holds (index, lo, hi, rule) {theirs}, this "
                                  f"shard is {mine}: the run used another model, shard count "
                                  f"or optimizer")
        # In place: a restored shard holds one vector of values, never two at once.
        w = state["w"]
        self.w.copy_(tensor_view(w) if isinstance(w, np.ndarray) else w)
        self.update.load_state_dict(state, _tensor)
        self.version, self.steps = state["version"], state["steps"]
        self.schedule.load_state_dict(state["schedule"])
        self.rejected = state["rejected"]
        self.staleness = Counter({int(k): v for k, v in state["staleness"].items()})
        self.applied = {int(k): tuple(v) for k, v in state.get("applied", {}).items()}
        if self.history is not None:  # what led to the state restored, and nothing since
            self.history = [tuple(op) for op in state.get("history", [])]
            self.history_base = state.get("history_base", self.version if "history" not in
                                          state else 0)
        self.snapshot_version, self.last_snapshot = self.version, self.clock()
        return self.version

    def stats(self) -> dict:
        return {"shard": self.index, "version": self.version, "steps": self.steps,
                "elements": self.w.numel(), "rejected": self.rejected,
                "duplicates": self.duplicates, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "staleness": dict(sorted(self.staleness.items())),
                "lr": self.lr(), "momentum": self.update.momentum(),
                "mean_staleness": self.update.mean_staleness,
                "uncompensated": self.update.uncompensated,
                "lookahead_sources": sorted(self.update.lookahead.velocity)
                if self.update.lookahead is not None else [],
                "snapshot_version": self.snapshot_version,
                "finite": bool(math.isfinite(float(self.w.sum())))}


def _tensor(array) -> torch.Tensor:
    """A float32 tensor of our own from a numpy array (possibly read-only) or a tensor."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return array.detach().float().clone()


def local_shards(config, initial: torch.Tensor, slots, retention) -> list[ParameterShard]:
    """The run's shards in this process (`--lockstep`, `--virtual`, `replay`): shard k owns
    `slots[k]` (a `layout.ShardSlot`) of `initial`, with its slice of the buffers'
    `retention` (`statistics.buffer_slice`)."""
    return [ParameterShard(k, s.lo, s.hi, s.param_end, initial[s.lo:s.hi], config,
                           retention=buffer_slice(retention, s.lo, s.hi, s.param_end))
            for k, s in enumerate(slots)]
