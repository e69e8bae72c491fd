"""A pipeline step as a Ray compiled graph (`ray.dag`, whose channels move values between actors
through shared memory, not the object store) against the same stages through ordinary actor
calls (what `--partitions` does), against the single process on the same cores.

ResNet-20 cut in two by the partitioner, each part in the pipeline's own stage actor
(`pipeline.actors.StageActor`) of one thread, batch --batch in --micro micro-batches under
1F1B (`schedule.submission_order`, ahead --ahead); the same calls in the same order both ways,
the compiled graph bound once in that order (a compiled graph runs each actor's tasks in the
order they were bound). images/s over --steps steps after 3 of warm-up, in --rounds
alternating rounds, medians reported.

    python benchmarks/bench_pipeline_graph.py [--steps 20] [--rounds 3] [--micro 8] [--ahead 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import ray
import torch
from ray.dag import InputNode, MultiOutputNode

from distbelief.distributed.pipeline.actors import StageActor
from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.schedule import submission_order
from distbelief.engine.config import TrainConfig
from distbelief.engine.trainer import build_optimizer
from distbelief.models import create_model

PARTS = 2
LR = 0.01


def step_calls(hosts, micro: int, ahead: int, inputs: list):
    """One step's calls in the pipeline's order (`Pipeline.submit_step`'s, ahead `ahead`):
    the results of the last stage's losses, both updates and the first stage's backward
    passes but its last; with graph inputs (not a list) the graph nodes instead of calls."""
    def call(host, method, *args, returns=1):
        target = getattr(host, method).options(num_returns=returns)
        return target.bind(*args) if bind else target.remote(*args)

    bind = not isinstance(inputs, list)
    acts, grads, losses, last = {}, {}, {}, {}
    for p, kind, m in submission_order("1f1b", PARTS, micro, ahead):
        if kind == "F" and p == 0:
            acts[m] = call(hosts[0], "forward", m, inputs[2 * m])
        elif kind == "F":
            node = call(hosts[1], "forward_loss_backward", m, acts[m], inputs[2 * m + 1],
                        1 / micro, returns=2)
            losses[m], grads[m] = node[0], node[1]
        elif p == 0:
            last[m] = call(hosts[0], "backward", m, grads[m])
    # As the pipeline: every update after the first stage's last backward. The first stage's
    # other backward passes return nothing; a compiled graph must still output them.
    updates = [call(host, "update", LR, last[micro - 1]) for host in hosts]
    return [losses[m] for m in range(micro)] + updates + [last[m] for m in range(micro - 1)]


def rate(step, steps: int, batch: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--steps", 20), ("--rounds", 3), ("--micro", 8), ("--ahead", 1),
                          ("--batch", 128)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    config = TrainConfig().replace(model="resnet20", lr=LR, device="cpu", channels_last=False)
    torch.manual_seed(0)
    plan = partition(create_model("resnet20", num_classes=10), PARTS, torch.zeros(1, 3, 32, 32))
    hosts = [StageActor.options(num_cpus=0).remote(part.index, PARTS, part.module, config, 1,
                                                   "cpu", build_optimizer)
             for part in plan.parts]
    x = np.random.randn(args.batch, 3, 32, 32).astype(np.float32)
    y = np.random.randint(0, 10, args.batch)
    inputs = [v for pair in zip(np.array_split(x, args.micro), np.array_split(y, args.micro))
              for v in pair]
    with InputNode() as node:
        graph = MultiOutputNode(step_calls(hosts, args.micro, args.ahead,
                                           node)).experimental_compile()
    model = create_model("resnet20", num_classes=10)  # the single process, 2 threads
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def single():
        torch.nn.functional.cross_entropy(model(tx), ty).backward()
        optimizer.step()
        optimizer.zero_grad()

    runs = {"single process, 2 threads": single,
            "actor calls (the pipeline's)": lambda: ray.get(
                step_calls(hosts, args.micro, args.ahead, inputs)),
            "compiled graph": lambda: ray.get(graph.execute(*inputs))}
    measured = {name: [] for name in runs}
    torch.set_num_threads(PARTS)
    for _ in range(args.rounds):
        for name, step in runs.items():
            measured[name].append(rate(step, args.steps, args.batch))
    graph.teardown()
    print(f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; {time.strftime('%Y-%m-%d')}; resnet20, batch {args.batch}, "
          f"{args.micro} micro-batches, 1f1b ahead {args.ahead}, {PARTS} parts of 1 thread")
    single_rate = statistics.median(measured["single process, 2 threads"])
    for name, rates in measured.items():
        median = statistics.median(rates)
        print(f"{name:<30} {median:>7.0f} images/s  {median / single_rate:>5.2f} of single  "
              f"rounds {[round(r) for r in rates]}")
    ray.shutdown()


if __name__ == "__main__":
    main()
