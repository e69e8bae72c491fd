"""Downpour SGD's model replica (Dean et al., 2012, Sec. 4.1). Plain Python: no Ray here.

A replica trains its own model copy on its own slice of the training data. Every `n_fetch` of
its steps it asks the parameter server for fresh parameters; every `n_push` steps it sends the
gradient accumulated since the last push. In the paper fetching, pushing and computing are
three weakly synchronized threads; here the replica issues fetches and pushes as asynchronous
requests (Ray calls, in `downpour.actors`) and keeps computing:

- a fetch issued at step t is installed at the first step boundary after it arrives; until then
  the replica computes with the parameters it has;
- a push is sent and forgotten, unless `max_in_flight` pushes are still outstanding: then the
  replica waits for the oldest. That is the only time it waits for the server.

With `overlap` off every fetch and push completes before the replica goes on; one such replica
with n_fetch = n_push = 1 is plain sequential SGD (tests/parity/test_downpour.py).

A push is checked whole before it is sent: one holding NaN or Inf goes to no shard (all or
none) and is counted as rejected. Each push carries its source (replica, incarnation, sequence
number), so that a shard applies it once even when Ray retries it after a restart.

The replica talks to the server through a client with two methods, `fetch(source)` and
`push(vector, base_versions, steps, errors, pull=False, source=None)`, each returning a pending
result (`distributed.pending`); the client slices full vectors into shard slices. When a push
is followed by a fetch at the next step, the two travel as one call per shard (`pull=True`: the
shard applies the push and returns its values), which saves a round trip without changing what
the replica sees (for pushes under 64 MiB; a larger push and its fetch go as two calls, so that
Ray's object store never holds both at once). `LocalClient` calls in-process shards directly
(tests); `downpour.actors.RayClient` calls shard actors.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque

import torch

from distbelief.data import BatchCursor, build_data
from distbelief.distributed.downpour.local import LocalSteps
from distbelief.distributed.downpour.rules import slim_momentum
from distbelief.distributed.downpour.shard import ParameterShard
from distbelief.distributed.downpour.statistics import BufferSync
from distbelief.distributed.flat import FlatModel, all_finite, model_vector
from distbelief.distributed.pending import Done, ItemOf
from distbelief.distributed.wire import wire_dtype
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import build_model, resolve_device, set_determinism
from distbelief.engine.weights import load_init


COMBINE_BELOW_BYTES = 64 << 20  # a push and the next fetch travel as one call below this
FETCH_POLL_S = 0.0005  # how often a replica waiting up to --fetch-wait-s looks for its fetch
WAIT_FRACTION = 0.5  # auto --fetch-wait-s: up to half a step (at most a third of the time)
MISS_BACKOFF = 8  # auto: after a wait that timed out, the steps that do not wait
STEP_EMA = 0.2  # auto: weight of the newest step in the step time it waits a fraction of


class RealClock:
    """A replica's time: the machine's. A --virtual run gives its replicas a simulated clock
    instead (`virtual.ProcessClock`), with the same four methods."""

    now = staticmethod(time.perf_counter)
    sleep = staticmethod(time.sleep)

    @staticmethod
    def computed(replica: int, step: int) -> None:
        """Called after a step's compute: here its time has passed already."""

    @staticmethod
    def wait(pending, limit: float) -> bool:
        """Wait up to `limit` seconds for `pending` (`distributed.pending`); whether it is
        done."""
        deadline = time.perf_counter() + limit
        arrived = pending.done()
        while not arrived and time.perf_counter() < deadline:
            time.sleep(FETCH_POLL_S)
            arrived = pending.done()
        return arrived


REAL_CLOCK = RealClock()


class FetchWait:
    """How long a replica with overlap waits for the fetch in flight before it computes on the
    parameters it has (`Exchange._arrived`).

    `fixed` seconds (--fetch-wait-s) when given. Else (None, the default) up to WAIT_FRACTION
    of the replica's step time (an average of `step_took`): the fetch that comes back with a
    push is issued as a step ends, so it arrives after the round trip; where that is short
    against a step (CPUs, large models) the wait saves a version of staleness per step for a
    few percent of the time. When a wait times out (round trips as long as steps: small
    models on fast devices), the next MISS_BACKOFF steps do not wait, so the time lost where
    waiting does not help stays near WAIT_FRACTION / (MISS_BACKOFF + 1) of a step.
    """

    def __init__(self, fixed: float | None):
        self.fixed = fixed
        self.step_s: float | None = None
        self.skip = 0  # steps left that do not wait (after a miss)

    @staticmethod
    def describe(config) -> str:
        """The policy in force, in one line (the driver prints it)."""
        c = config.downpour
        if not c.overlap:
            return "waits for every fetch (no overlap)"
        if c.fetch_wait_s is None:
            return f"waits for its fetch up to {WAIT_FRACTION:g} of a step (--fetch-wait-s)"
        if c.fetch_wait_s == 0:
            return "never waits for a fetch in flight (--fetch-wait-s 0, the paper's replica)"
        return f"waits for its fetch up to {c.fetch_wait_s:g} s (--fetch-wait-s)"

    def step_took(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else \
            (1 - STEP_EMA) * self.step_s + STEP_EMA * seconds

    def limit(self) -> float:
        """Seconds to wait at this step boundary (0: look once, do not wait)."""
        if self.fixed is not None:
            return self.fixed
        if self.skip:
            self.skip -= 1
            return 0.0
        return WAIT_FRACTION * self.step_s if self.step_s is not None else 0.0

    def waited(self, arrived: bool) -> None:
        """After a wait of `limit()` > 0: a miss makes the next steps not wait (auto only)."""
        if not arrived and self.fixed is None:
            self.skip = MISS_BACKOFF


class LocalClient:
    """The server client over in-process `ParameterShard`s: each call completes at once.
    `offset`: where the client's slice of the server vector starts (a partition's block);
    `dtype`: what pulls travel in (pushes arrive in the dtype the replica made them in)."""

    def __init__(self, shards: list[ParameterShard], offset: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.shards, self.offset, self.dtype = shards, offset, dtype

    def fetch(self, source=None) -> Done:
        return Done(self._pull(source))

    def _pull(self, source=None) -> tuple[torch.Tensor, list[int]]:
        pulled = [s.pull(source=source, dtype=self.dtype) for s in self.shards]
        return torch.cat([w for w, _ in pulled]), [v for _, v in pulled]

    def push(self, vector: torch.Tensor, base_versions: list[int], steps: int,
             errors: tuple[float, ...], pull: bool = False, source: tuple | None = None) -> Done:
        o = self.offset
        replies = [s.push(vector[s.lo - o:s.hi - o], v, steps, errors, source)
                   for s, v in zip(self.shards, base_versions)]
        return Done((replies, self._pull(source)) if pull else replies)


class Exchange:
    """One replica's (or one partition's) traffic with the parameter server over `flat` (a
    `FlatModel`: its parameters and buffers are the server vector, or this partition's slice
    of it, that `client` reaches): fetches installed at step boundaries, gradients accumulated
    and pushed every n_push steps, at most `max_in_flight` pushes outstanding (module doc).

    `fetch(step, metrics)` before a step's compute; `add(gradient, error)` after it, then
    `push_due(step)` / `push(step, metrics)`; `drain()` at the end. `source_index` names the
    pushes' source for the shards' exactly-once check (unique among the server's clients);
    `clock` times its waits (`RealClock`).
    """

    def __init__(self, source_index: int, config, client, flat: FlatModel,
                 clock: RealClock = REAL_CLOCK):
        self.source_index, self.config, self.client, self.flat = source_index, config, client, flat
        self.clock = clock
        self.n_buffers = flat.n_buffers
        self.buffers = BufferSync(flat.model, config.downpour.bn_stats)
        self.slim = slim_momentum(config)  # dana-slim: this replica's momentum
        d = config.downpour
        # --local-steps: plain SGD steps on the replica, their change pushed (`local`).
        self.local = LocalSteps(config, flat) if d.local_steps else None
        self.push_every = d.local_steps or d.n_push
        self.fetch_every = d.local_steps or d.n_fetch
        self.dtype = wire_dtype(config)
        self.wire: torch.Tensor | None = None  # a push as it travels, reused (module doc)
        self.versions: list[int] | None = None  # shard versions of the parameters in use
        self.buffer_base: torch.Tensor | None = None  # buffers when last fetched or pushed
        self.pending_fetch = None
        self.fetched_for: int | None = None  # the step the last fetch was issued for
        # Which request brought the parameters in use (its sequence number), and for each
        # step accumulated since the last push, (step, that number): the push's trace, which
        # shards record under --record-order (`downpour.replay` re-executes from it).
        self.pending_sequence: int | None = None
        self.installed_sequence: int | None = None
        self.step_now: int | None = None
        self.trace: list[tuple[int, int]] = []
        self.in_flight: deque = deque()
        self.accum: torch.Tensor | None = None  # gradient accumulated since the last push
        self.accum_versions: list[int] | None = None  # versions of its oldest gradient
        self.accum_errors: list[float] = []
        # A request's source: shards skip a push they applied already (a retry after a
        # restart); fetches and pushes share the sequence, so that each names its request.
        self.incarnation, self.sequence = uuid.uuid4().hex, 0
        self.wait = FetchWait(config.downpour.fetch_wait_s)
        self.step_start: float | None = None  # when the step after the last fetch() began

    def install(self, fetched) -> None:
        """Load fetched (vector, versions) into the model; a copy straight from the fetched
        vector, which may be a view of shared memory or a low-precision array."""
        vector, versions = fetched
        n_params = vector.numel() - self.n_buffers
        server_buffers = vector[n_params:].to(torch.float32, copy=True)
        buffers = server_buffers
        if self.n_buffers:
            # The statistics not yet pushed stay (`statistics.BufferSync`).
            local = None if self.buffer_base is None else self.flat.buffer_vector()
            buffers = self.buffers.installed(server_buffers, local, self.buffer_base)
        self.flat.load_parts(vector[:n_params], buffers)
        self.buffer_base = self.buffers.base(server_buffers)
        self.versions = list(versions)
        if self.local is not None:  # the change pushed next counts from these parameters
            self.local.started()

    def add(self, gradient: torch.Tensor, error: float, copy: bool = False) -> None:
        """Accumulate one step's gradient (and its training error, for the shards' warmup: a
        number or a 0-d tensor, read at the push);
        `copy`: the first is copied, to float32 (the caller reuses `gradient`'s memory before
        the push, and several steps add up)."""
        self._step_ended()
        if self.accum is None:
            # Several steps add up in float32 (a bfloat16 partition's gradients too).
            self.accum = gradient.to(torch.float32, copy=True) if copy else gradient
            self.accum_versions = list(self.versions)
        else:
            self.accum += gradient
        self.accum_errors.append(error)

    def add_local(self, step: int, error) -> None:
        """--local-steps: one plain SGD step on the replica's copy with the gradients of its
        step `step` (`LocalSteps.step`); `error` as in `add`. The push sends the change."""
        self._step_ended()
        self.local.step(step, error)
        if self.accum_versions is None:
            self.accum_versions = list(self.versions)
        self.accum_errors.append(error)

    def _step_ended(self) -> None:
        self.trace.append((self.step_now, self.installed_sequence))
        if self.step_start is not None:
            self.wait.step_took(self.clock.now() - self.step_start)
            self.step_start = None

    def reset(self) -> None:
        """Drop the gradient (or the local steps' change) accumulated since the last push
        (its steps will be trained again: the chunk they belong to failed)."""
        self.accum, self.accum_versions, self.accum_errors = None, None, []
        self.trace = []
        if self.local is not None and self.versions is not None:
            self.local.started()

    def push_due(self, step: int) -> bool:
        return (step + 1) % self.push_every == 0

    def _vector(self) -> torch.Tensor:
        """The push as it travels: [accumulated gradient; buffer changes] in the transfer
        dtype, on the CPU, written into one reused array in one pass (gradient and statistics
        are copied, cast and moved off the device together). The client copies it into the
        object store before `push` returns, so it can be reused at the next push."""
        n_params = self.accum.numel()
        if not self.n_buffers and self.dtype == self.accum.dtype and self.accum.device.type == \
                "cpu":
            return self.accum  # nothing to add, cast or move: the gradient itself
        if self.wire is None:
            self.wire = torch.empty(n_params + self.n_buffers, dtype=self.dtype)
        self.wire[:n_params].copy_(self.accum)
        if self.n_buffers:
            buffers_now = self.flat.buffer_vector()
            self.wire[n_params:].copy_(buffers_now - self.buffer_base)
            self.buffer_base = self.buffers.base(buffers_now)
            if self.buffers.ema is not None:  # the accumulators start again from zero
                self.flat.load_buffers(self.buffer_base)
        return self.wire

    def push(self, step: int | None, metrics: dict) -> None:
        """Send the push accumulated up to step `step` (None: a last push, `drain`, which
        brings no fetch back)."""
        if self.local is not None:  # what --local-steps sends: the change of its parameters
            self.accum = self.local.change()
        if self.slim is not None:  # what DANA-Slim sends: d + momentum * v (`SlimMomentum`)
            self.accum = self.slim.push(self.accum, self.flat.parameter_vector()
                                        if self.slim.weight_decay else None)
        vector = self._vector()
        steps, errors = len(self.accum_errors), tuple(float(e) for e in self.accum_errors)
        versions, trace = self.accum_versions, tuple(self.trace)
        self.accum, self.accum_versions, self.accum_errors = None, None, []
        self.trace = []
        if not all_finite(vector):
            # All or none: a push some shard would refuse goes to none of them, so that no
            # slice of the model moves without the others.
            metrics["rejected"] += 1
            return
        # The next step fetches: let this push bring the parameters back (one call, not two),
        # unless the push is large: then the round trip saved is little against the transfer,
        # and one call would hold the push and the values in Ray's object store at once.
        pull = (step is not None and self.pending_fetch is None
                and (step + 1) % self.fetch_every == 0
                and vector.numel() * vector.element_size() < COMBINE_BELOW_BYTES)
        self.sequence += 1
        pending = self.client.push(vector, versions, steps, errors, pull=pull,
                                   source=(self.source_index, self.incarnation, self.sequence,
                                           trace))
        metrics["pushes"] += 1
        if pull:
            self.pending_fetch, self.fetched_for = ItemOf(pending, 1), step + 1
            self.pending_sequence = self.sequence
            metrics["fetches"] += 1
            pending = ItemOf(pending, 0)
        self.in_flight.append(pending)
        wait_start = self.clock.now()
        limit = self.config.downpour.max_in_flight if self.config.downpour.overlap else 0
        while self.in_flight and (self.in_flight[0].done() or len(self.in_flight) > limit):
            self._count_reply(self.in_flight.popleft().result(), metrics)
        metrics["push_wait_s"] += self.clock.now() - wait_start

    @staticmethod
    def _count_reply(replies: list[dict], metrics: dict) -> None:
        metrics["rejected"] += sum(not r["accepted"] for r in replies)

    def drain(self) -> dict:
        """At the end of a run, or a stop: push what was accumulated since the last push (the
        steps of a round that --n-push or --local-steps had not completed: they count as
        trained, so their gradient or change must reach the server), then wait for every
        outstanding push; returns {"rejected": pushes the server refused}."""
        metrics = {"rejected": 0, "pushes": 0, "fetches": 0, "push_wait_s": 0.0}
        if self.accum_errors:
            self.push(None, metrics)
        while self.in_flight:
            self._count_reply(self.in_flight.popleft().result(), metrics)
        return {"rejected": metrics["rejected"]}

    def fetch(self, step: int, metrics: dict) -> None:
        """Before step `step`: issue a fetch when one is due, install one that has arrived
        (wait for it when there are no parameters yet, or without overlap)."""
        due = self.versions is None or step % self.fetch_every == 0
        self.step_now = step
        if due and self.pending_fetch is None and self.fetched_for != step:
            self.sequence += 1
            self.pending_fetch = self.client.fetch((self.source_index, self.incarnation,
                                                    self.sequence))
            self.fetched_for, self.pending_sequence = step, self.sequence
            metrics["fetches"] += 1
        if self.pending_fetch is not None:
            self._take_fetch(metrics)
        self.step_start = self.clock.now()

    def _take_fetch(self, metrics: dict) -> None:
        """Install the fetch in flight if it is there, or must be (module doc)."""
        if self.versions is None or not self.config.downpour.overlap or self.local is not None:
            # Nothing to compute with yet (or no overlap): wait for the parameters. Local
            # steps wait too: installed later, the fetch would overwrite steps not yet pushed
            # (fetches are issued with the push, so the wait is one round trip per round).
            wait_start = self.clock.now()
            self._install_pending()
            metrics["fetch_wait_s"] += self.clock.now() - wait_start
        elif self._arrived(metrics):  # overlap: install whatever has arrived
            self._install_pending()

    def _install_pending(self) -> None:
        self.install(self.pending_fetch.result())
        self.pending_fetch, self.installed_sequence = None, self.pending_sequence

    def _arrived(self, metrics: dict) -> bool:
        """Whether the fetch in flight is there, waiting up to `FetchWait.limit()` for it: a
        fetch issued with the last push is still on its way when the next step starts, and
        without the wait every step computes on parameters one step older than the replica's
        own last push (a version of staleness per step, for a round trip of milliseconds)."""
        if self.pending_fetch.done():
            return True
        limit = self.wait.limit()
        if limit <= 0:
            return False
        start = self.clock.now()
        arrived = self.clock.wait(self.pending_fetch, limit)
        metrics["fetch_wait_s"] += self.clock.now() - start
        self.wait.waited(arrived)
        return arrived


def straggler_delay(config, replica: int) -> float:
    """Seconds replica `replica` sleeps after each step: --straggler-delay (a sandblaster
    setting that Downpour shares) slows replica 0 alone."""
    return config.sandblaster.straggler_delay if replica == 0 else 0.0


def chunk_metrics(replica: int, start: int, steps: int) -> dict:
    """A chunk's metrics before its first step (`DownpourReplica.run`)."""
    return {"replica": replica, "start": start, "steps": steps, "images": 0, "loss_sum": 0.0,
            "wrong": 0, "compute_s": 0.0, "fetch_wait_s": 0.0, "push_wait_s": 0.0,
            "bound_wait_s": 0.0, "fetches": 0, "pushes": 0, "rejected": 0}


class DownpourReplica:
    """Replica `index` of `config.cluster.replicas`, computing on `device` (default:
    config.device); `bound` (a `bound.StalenessBound`, --ssp-bound) makes it wait while it is
    too far ahead of the slowest replica.

    `clock` is its time (`RealClock`; a --virtual run's is simulated); `arrays` the data
    already loaded (`data.build.load_arrays`), of which it takes its slice; `model` the
    config's model to train, placed on `device`, instead of one built here (a --virtual run
    copies one for all its replicas): its values do not matter, the first fetch replaces them.

    `run(start, steps)` trains its steps start .. start+steps-1 (batch i of its data slice is a
    pure function of (seed, index, i), so a restarted replica resumes at any step) and returns
    that chunk's metrics. Pushes may still be in flight when it returns; `drain()` waits for
    them.
    """

    def __init__(self, index: int, config, client, stats: dict | None = None,
                 device: torch.device | None = None, bound=None, clock: RealClock = REAL_CLOCK,
                 arrays: tuple | None = None, model: torch.nn.Module | None = None):
        self.index, self.config, self.bound, self.clock = index, config, bound, clock
        self.delay = straggler_delay(config, index)
        self.device = device or resolve_device(config.device)
        set_determinism(config.deterministic, self.device)
        self.data = build_data(config, self.device, stats=stats,
                               part=(index, config.cluster.replicas), arrays=arrays)
        self.model = model if model is not None else build_model(config, self.data, self.device)
        self.model.train()
        self.flat = FlatModel(self.model)
        self.loss = get_loss(config.loss)
        self.exchange = Exchange(index, config, client, self.flat, clock)
        self.cursor = BatchCursor(self.data.train)

    @property
    def in_flight(self) -> deque:
        return self.exchange.in_flight

    def _install(self, fetched) -> None:
        self.exchange.install(fetched)

    def drain(self) -> dict:
        """Wait for every outstanding push; returns {"rejected": pushes the server refused}."""
        return self.exchange.drain()

    # --- training ----------------------------------------------------------------------

    def run(self, start: int, steps: int) -> dict:
        """Train steps start .. start+steps-1; returns the chunk's metrics: steps, images,
        loss_sum and wrong (sums over images), seconds, compute_s, fetch_wait_s, push_wait_s,
        fetches, pushes, rejected (pushes refused by a shard)."""
        c, model, exchange = self.config, self.model, self.exchange
        metrics = chunk_metrics(self.index, start, steps)
        clock = self.clock
        begin = clock.now()
        batches = self.cursor.at(start)
        loss_sum = wrong_sum = 0
        for step in range(start, start + steps):
            if self.bound is not None:
                self.bound.before(step, metrics)
            exchange.fetch(step, metrics)
            compute_start = clock.now()
            x, y = next(batches)
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
                logits = model(x)
                loss = self.loss(logits, y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            clock.computed(self.index, step)
            # Tensors, read at the push and the chunk's end: no wait for the device per step.
            wrong = self.loss.wrong(logits, y)
            if exchange.local is not None:
                exchange.add_local(step, wrong.double() / len(y))
            else:
                exchange.add(self.flat.gradient(), wrong.double() / len(y))
            loss_sum = loss_sum + loss.detach().double() * len(y)  # float64, as float() gave
            wrong_sum = wrong_sum + wrong
            metrics["images"] += len(y)
            metrics["compute_s"] += clock.now() - compute_start
            if exchange.push_due(step):
                exchange.push(step, metrics)
            if self.delay:
                clock.sleep(self.delay)
            if self.bound is not None:
                self.bound.after(step + 1)
        self.cursor.ended(start + steps)
        metrics["loss_sum"], metrics["wrong"] = float(loss_sum), int(wrong_sum)
        metrics["seconds"] = clock.now() - begin
        if not math.isfinite(metrics["loss_sum"]):
            metrics["diverged"] = True
        return metrics


def initial_model(config, data) -> torch.nn.Module:
    """The model for `config.seed` as the single-process trainer initializes it
    (torch.manual_seed(seed), then the model, then --init-from's weights)."""
    torch.manual_seed(config.seed)
    return load_init(build_model(config, data), config)


def initial_vector(config, data) -> tuple[torch.Tensor, int]:
    """The initial model's [parameters; buffers] vector (`initial_model`)."""
    return model_vector(initial_model(config, data))
