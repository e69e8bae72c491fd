"""Sandblaster L-BFGS in DistBelief's Fig. 4 on the virtual cluster (`fig4`). No Ray.

Sandblaster's numbers do not depend on how many replicas compute a round: each round is the
batch's exact gradient, however its portions are spread (the Ray version equals the one-process
objective, `LocalBatchObjective`, to 1e-5: tests/parity/test_sandblaster.py). So L-BFGS runs
once, for real, in this process, and the test error is evaluated after every iteration
(`trajectory`); what depends on the replica count is a round's time, which `round_seconds`
simulates with the cost model the Downpour runs use (`downpour.costs`):

- the coordinator's two round trips to the shards per round (the round's start, and the
  gradient's finish with L-BFGS's vector operations, scalars only);
- every replica fetches x: each shard sends its slice over its node's link, one replica after
  another;
- the batch is cut into portions (--portions: 16 per replica by default) handed out one at a
  time to whichever replica is free first, each costing its examples' compute (a step's time
  per example, drawn per replica with the spread and stragglers of `StepTimes`) and a report's
  round trip to the coordinator;
- every --push-every portions, and at the end, a replica pushes its summed gradient: a
  model-sized message to the shards, which add it in the measured time of a push;
- backup tasks are not simulated (with the default spread they would rarely run).
"""

from __future__ import annotations

import heapq
import time

import torch

from distbelief.data import build_data
from distbelief.distributed.downpour.costs import REQUEST_BYTES, Network, StepTimes
from distbelief.distributed.sandblaster import LocalBatchObjective
from distbelief.engine.config import parse_link
from distbelief.engine.evaluate import evaluate
from distbelief.optim import shard_bounds
from distbelief.optim.lbfgs import LBFGS, LocalStore

PORTIONS_PER_REPLICA = 16  # as --portions's default
COORDINATOR_TRIPS = 2  # round trips to the shards per round: its start and its finish


def trajectory(config, target: float, iterations: int = 200) -> dict:
    """L-BFGS on `config`'s batch objective until the test error is at most `target` (or
    `iterations`): {"rounds": objective evaluations when it first was (None if never),
    "iterations": L-BFGS iterations then, "final": the last test error, "real_s", "examples"
    (the batch: the training set) and "values" (the model's)}."""
    start = time.perf_counter()
    objective = LocalBatchObjective(config)
    test = build_data(config, torch.device("cpu")).splits["test"]
    store = LocalStore()
    store.run([("set", "x", objective.initial)])
    opt = LBFGS(store, objective, history=config.sandblaster.history, lr=config.lr,
                line_search=config.sandblaster.line_search)
    rounds = opt.start()["evals"]
    out = {"rounds": None, "iterations": None, "final": None}
    for i in range(1, iterations + 1):
        record = opt.step()
        rounds += record["evals"]
        objective.flat.load(store.read("x"))
        out["final"] = evaluate(objective.model, test.batches(), loss=config.loss)["error"]
        if out["final"] <= target:
            out.update(rounds=rounds, iterations=i)
            break
        if record.get("converged"):
            break
    return {**out, "real_s": time.perf_counter() - start, "examples": objective.train_size,
            "values": objective.flat.n_params + objective.flat.n_buffers}


def round_seconds(config, replicas: int, example_s: float, push_s: float, round_index: int,
                  values: int, examples: int) -> float:
    """Simulated seconds of round `round_index` (module doc) on `replicas` replicas, each
    computing an example in `example_s` (times its `StepTimes` draw), for a model of `values`
    float32 values on `config.cluster.ps_shards` shards that add a push in `push_s` (one at a
    time), over a batch of `examples`."""
    sb = config.sandblaster
    shards = _Shards(config, values, push_s)
    times = [StepTimes(config, r, example_s, part=round_index) for r in range(replicas)]
    trip = 2 * shards.net.latency
    begun = COORDINATOR_TRIPS // 2 * trip  # the coordinator has started the round
    queue = [(shards.fetch(begun, r), r) for r in range(replicas)]
    heapq.heapify(queue)
    portions = sb.portions or PORTIONS_PER_REPLICA * replicas
    held, end = [0] * replicas, 0.0
    for part in torch.arange(examples).tensor_split(portions):
        start, r = heapq.heappop(queue)
        done = start + times[r].next() * len(part) + trip  # computed, reported, next given
        held[r] += 1
        if held[r] == sb.push_every:
            end = max(end, shards.push(done, r))
            held[r] = 0
        heapq.heappush(queue, (done, r))
    for done, r in queue:  # the flush: what each replica still holds
        end = max(end, shards.push(done, r) if held[r] else done)
    return end + (COORDINATOR_TRIPS - COORDINATOR_TRIPS // 2) * trip


class _Shards:
    """The round's shards on their nodes: slices of a model of `values` float32 values, each
    shard adding one push at a time in `push_s`."""

    def __init__(self, config, values: int, push_s: float):
        self.net = Network(*parse_link(config.downpour.virtual_link))
        self.sizes = [4 * (hi - lo) for lo, hi in shard_bounds(values,
                                                                config.cluster.ps_shards)]
        self.free = [0.0] * len(self.sizes)
        self.push_s = push_s

    def fetch(self, when: float, replica: int) -> float:
        """When replica `replica`, asking at `when`, has every shard's slice of x."""
        asked = when + self.net.latency
        return max(self.net.send(asked, ("shard", k), ("replica", replica), size)
                   for k, size in enumerate(self.sizes))

    def push(self, when: float, replica: int) -> float:
        """When every shard has added the gradient replica `replica` sends at `when`."""
        done = 0.0
        for k, size in enumerate(self.sizes):
            arrived = self.net.send(when, ("replica", replica), ("shard", k),
                                    size + REQUEST_BYTES)
            self.free[k] = max(arrived, self.free[k]) + self.push_s
            done = max(done, self.free[k])
        return done
