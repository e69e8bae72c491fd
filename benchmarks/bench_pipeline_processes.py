"""The pipeline without Ray: the same stages, schedule and collective hand-offs
(`relay.relay_step` over `link.Link`) in plain processes, one per partition, in a gloo group of
their own, against one process on the same cores, alternating. What this reads is the
pipeline's ceiling on the machine: what is left once Ray's processes, calls and object store
are out of the way.

Each round: the single process (--partitions threads, batch --batch) for --steps steps, then
the P stage processes (one thread each, M = --micro micro-batches, 1F1B with --ahead) for
--steps steps after 3 of warm-up, timed by the first stage between two barriers; each
pipeline run against the mean of the single process on either side of it, as
`bench_pipeline.py` does. Synthetic 3x32x32 images, SGD with momentum.

    python benchmarks/bench_pipeline_processes.py [--model resnet20] [--partitions 2]
        [--micro 8] [--steps 20] [--rounds 6] [--partition-at layer2.1]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distbelief.distributed.pipeline.link import Link
from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.relay import relay_step
from distbelief.distributed.pipeline.schedule import micro_batches, stage_order
from distbelief.distributed.pipeline.stage import Stage
from distbelief.engine.losses import get_loss
from distbelief.models import create_model

WARMUP = 3


def sgd(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)


def stage_process(rank: int, args, port: int, rates) -> None:
    """Stage `rank`: its part of the model, WARMUP + --steps steps; the first stage puts
    the images/s of the timed steps in `rates`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.partitions)
    try:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10)
        part = partition(model, args.partitions, torch.zeros(1, 3, 32, 32),
                         args.partition_at).parts[rank]
        stage = Stage(rank, args.partitions, part.module, get_loss("cross_entropy"),
                      sgd(part.module) if part.params else None)
        link, parts = Link(rank), micro_batches(*batch(args.batch), args.micro)
        order = stage_order("1f1b", rank, args.partitions, len(parts), args.ahead)
        for step in range(WARMUP + args.steps):
            if step == WARMUP:
                dist.barrier()
                start = time.perf_counter()
            relay_step(stage, link, link.send, step, order, fused=True,
                       inputs=[p[0] for p in parts], labels=[p[1] for p in parts],
                       weights=[p[2] for p in parts], lr=0.1)
        link.begin(-1)
        dist.barrier()
        if rank == 0:
            rates.put(args.steps * args.batch / (time.perf_counter() - start))
    finally:
        dist.destroy_process_group()


def single_rate(args) -> float:
    """images/s of the whole model in this process on --partitions threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.partitions)
    try:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10)
        optimizer, loss, (x, y) = sgd(model), get_loss("cross_entropy"), batch(args.batch)
        for step in range(WARMUP + args.steps):
            if step == WARMUP:
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss(model(x), y).backward()
            optimizer.step()
        return args.steps * args.batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--ahead", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--partition-at", default="", help="as --partition-at (default: the "
                                                           "balanced cut)")
    args = parser.parse_args()
    p, m = args.partitions, args.micro
    ideal = m / (m + p - 1)
    print(f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; {args.model}, batch {args.batch}, {p} stage processes "
          f"of 1 thread (no Ray), M = {m}, 1F1B ahead {args.ahead}, cut "
          f"{args.partition_at or 'balanced'}; ideal {ideal:.2f}")
    context = mp.get_context("spawn")
    before, ratios = single_rate(args), []
    for r in range(args.rounds):
        rates = context.SimpleQueue()
        mp.start_processes(stage_process, args=(args, free_port(), rates), nprocs=p,
                           start_method="spawn")
        rate, after = rates.get(), single_rate(args)
        ratios.append(2 * rate / (before + after))
        print(f"round {r}: single {before:.0f} / {after:.0f}, pipeline {rate:.0f} images/s, "
              f"ratio {ratios[-1]:.2f}, of ideal {ratios[-1] / ideal:.2f}", flush=True)
        before = after
    median = float(np.median(ratios))
    print(f"median: ratio {median:.2f}, of ideal {median / ideal:.2f}")


if __name__ == "__main__":
    main()
