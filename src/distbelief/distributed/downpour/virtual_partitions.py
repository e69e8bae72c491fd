"""Partitioned replicas on the virtual cluster (--virtual --partitions P). No Ray.

A replica cut into P partitions runs as it does on Ray (`partitioned`): its head
(`PartitionedReplica`) submits every call of a step to its stages (`ServerStage`: the part's
layers and its own exchange with the shards that hold them) and waits for the results; each
stage runs its calls one at a time, in order, each as soon as its arguments are there. Here
each stage is a `StageMachine`: a process of the event loop on a node of its own, standing in
for the stage's actor. What is simulated is when: a pass takes the cost model's time
(`costs`: the step's time x the part's share of the multiply-adds x the micro-batch's share
of the batch x 1/3 forward or 2/3 backward), and an activation or its gradient reaches the
next stage after its bytes crossed the two nodes' links. The head sits on partition 0's node
(the input batch needs no transfer there); each call is a message from it to the stage's
node, as an actor call is. A stage's exchange waits (a fetch, a full push
window) in simulated time, in its own process, as the actor would.
"""

from __future__ import annotations

from collections import deque

import torch

from distbelief.distributed.downpour.costs import REQUEST_BYTES, StepTimes
from distbelief.distributed.downpour.partitioned import PartitionedReplica, ServerStage
from distbelief.distributed.downpour.simulation import Signal
from distbelief.distributed.downpour.virtual import ProcessClock, VirtualClient
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import build_model

RETURNS = {"forward_loss_backward": 2}  # calls with several results, as on the actors
PASS_SHARE = {"forward": 1 / 3, "forward_loss": 1 / 3, "backward": 2 / 3,
              "forward_loss_backward": 1.0}  # of a step's compute, per pass kind
TIMED = (*PASS_SHARE, "finish")  # calls whose compute the cost model decides


class Result(Signal):
    """A call's result on node `node` (what a Ray object reference is on the actors)."""

    def __init__(self, loop, node):
        super().__init__(loop, 1, lambda values: values[0])
        self.node = node

    def value(self):
        return self.values[0]


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return REQUEST_BYTES  # a loss, a count, a metrics dict: a few numbers


def delivered(loop, network, value, source, target) -> Signal:
    """A signal done when `value` (a `Result`: once it exists; None: a call's message) has
    crossed the links from node `source` to node `target`."""
    here = Signal(loop)

    def send() -> None:
        data = value.value() if isinstance(value, Result) else value
        loop.at(network.send(loop.now, source, target, _nbytes(data)), here.set)

    if isinstance(value, Result):
        value.then(send)
    else:
        send()
    return here


class StageMachine:
    """Partition `stage.index`'s node `node` (module doc): `submit(method, args)` queues a
    call and returns its `Result`s; a process runs the calls in order, each once its
    arguments have arrived, and charges a pass `share` x its micro-batch's share of `batch`
    rows x the pass kind's share of `times.next()`. `close()` ends the process once the
    queue is empty."""

    def __init__(self, loop, network, node, stage: ServerStage, times: StepTimes,
                 share: float, batch: int):
        self.loop, self.network, self.node, self.stage = loop, network, node, stage
        self.times, self.share, self.batch = times, share, batch
        self.queue: deque = deque()
        self.idle: Signal | None = None
        self.closed = False
        self.rows: dict[int, int] = {}  # micro-batch -> its rows, from its forward pass
        loop.spawn(self._main, f"stage {node}")

    def submit(self, method: str, args: tuple, source):
        """Call `method(*args)` on the stage; plain arguments come from node `source`."""
        results = [Result(self.loop, self.node) for _ in range(RETURNS.get(method, 1))]
        # The call itself is a message from `source`, as an actor call is.
        arrivals = [delivered(self.loop, self.network, None, source, self.node),
                    *(self._arrival(a, source) for a in args)]
        self.queue.append((method, args, arrivals, results))
        self._wake()
        return results[0] if len(results) == 1 else tuple(results)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.idle is not None:
            idle, self.idle = self.idle, None
            idle.set()

    def _arrival(self, arg, source) -> Signal | None:
        """When `arg` is here: a result once it exists and crossed the links from its node;
        a tensor sent along with the call at once from `source`; anything else is here."""
        if not isinstance(arg, (Result, torch.Tensor)):
            return None
        origin = arg.node if isinstance(arg, Result) else source
        return delivered(self.loop, self.network, arg, origin, self.node)

    def _main(self) -> None:
        while True:
            while not self.queue:
                if self.closed:
                    return
                self.idle = Signal(self.loop)
                self.loop.wait(self.idle)
            method, args, arrivals, results = self.queue.popleft()
            for arrival in arrivals:
                if arrival is not None:
                    self.loop.wait(arrival)
            values = [a.value() if isinstance(a, Result) else a for a in args]
            self._run(method, values, results)

    def _run(self, method: str, args: list, results: list[Result]) -> None:
        stage = self.stage
        compute_s = stage.compute_s
        out = getattr(stage, method)(*args)
        if method in TIMED:  # the stage timed it on this machine's clock: the model's instead
            seconds = self._cost(method, args)
            stage.compute_s = compute_s + seconds
            if seconds:
                self.loop.sleep(seconds)
        for result, value in zip(results, out if len(results) > 1 else (out,)):
            result.give(0, value)

    def _cost(self, method: str, args: list) -> float:
        if method not in PASS_SHARE or not self.share:
            return 0.0
        micro = args[0]
        if method == "backward":  # its rows: those its forward pass had
            rows = self.rows.pop(micro)
        else:
            rows = len(args[1])
            if method != "forward_loss_backward":  # a backward pass follows
                self.rows[micro] = rows
        return self.times.next() * self.share * rows / self.batch * PASS_SHARE[method]


class VirtualPartitionedReplica:
    """Replica `index` cut as `plan` says, on the virtual cluster (module doc): the
    `DownpourReplica` interface (`run`, `drain`), its head a `PartitionedReplica` over
    `StageMachine`s. `slots` are the shards' `layout.ShardSlot`s; `step_s` a whole step's
    compute time on one node."""

    def __init__(self, index: int, config, data, plan, slots, server, step_s: float,
                 arrays=None):
        loop, network = server.loop, server.network
        count = len(plan.parts)
        with torch.device("meta"):  # a fresh cut per replica: each materialises its own
            modules = plan.modules_of(build_model(config, data))
        macs = [part.macs for part in plan.parts]
        self.machines = []
        for p, module in enumerate(modules):
            ks = [k for k, s in enumerate(slots) if s.part == p]
            node = ("replica", index, p)
            client = VirtualClient(server, node, ks, min((slots[k].lo for k in ks), default=0))
            stage = ServerStage(p, count, module, get_loss(config.loss), config, client,
                                replica=index, clock=ProcessClock(loop, None))
            self.machines.append(StageMachine(
                loop, network, node, stage, StepTimes(config, index, 1.0, part=p),
                step_s * macs[p] / max(1, sum(macs)), config.batch_size))
        self.loop, self.network, self.head_node = loop, network, ("replica", index, 0)
        self.head = PartitionedReplica(index, config, self._call, self._resolve, count,
                                       stats=data.stats, clock=ProcessClock(loop, None),
                                       arrays=arrays)

    def _call(self, p: int, method: str, *args):
        return self.machines[p].submit(method, args, self.head_node)

    def _resolve(self, results: list) -> list:
        """The values of `results`, once each has reached the head's node."""
        for result in results:
            self.loop.wait(delivered(self.loop, self.network, result, result.node,
                                     self.head_node))
        return [result.value() for result in results]

    def run(self, start: int, steps: int) -> dict:
        return self.head.run(start, steps)

    def drain(self) -> dict:
        """Every stage's pushes waited for; then the stages' processes end."""
        drained = self.head.drain()
        for machine in self.machines:
            machine.close()
        return drained
