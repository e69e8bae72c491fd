"""A model no single worker holds: a deep MLP of --hidden 16384 (1.07 billion parameters,
4.3 GB in float32) trained for a few Downpour steps with every replica cut into P partitions
and the server into K shards aligned to them, on this one machine.

Reported per partition actor and per shard: the parameters it holds and its peak resident
memory, next to the model's total; the driver's peak; seconds per step. Each partition should
hold about 1/P of the parameters, each shard about 1/K. Momentum and weight decay are off (the
shards then keep no optimizer state beside the values), the run directory is none and nothing
is evaluated: the driver never builds the whole model after the start, where it initializes
the values once as the single-process trainer would.

    python benchmarks/bench_big_model.py [--hidden 16384] [--partitions 4] [--shards 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import ray
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.runtime import peak_memory, start_ray
from distbelief.engine.config import TrainConfig

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=16384)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    config = TrainConfig().replace(
        recipe="bench", model="deep_mlp", hidden=args.hidden, data="digits", mode="downpour",
        replicas=args.replicas, partitions=args.partitions, ps_shards=args.shards,
        iterations=args.steps, batch_size=32, lr=1e-4, momentum=0.0, weight_decay=0.0,
        eval_every=0, checkpoint_every=0, log_every=args.steps, device="cpu",
        snapshot_every_s=3600.0, max_in_flight=1)
    print(f"# {platform.node()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB RAM, "
          f"torch {torch.__version__}, ray {ray.__version__}; {time.strftime('%Y-%m-%d')}")
    start_ray()
    begin = time.perf_counter()
    trainer = DownpourTrainer(config)  # initializes the values, cuts the model, aligns shards
    n_params = sum(p.params for p in trainer.plan.parts)
    print(f"deep_mlp --hidden {args.hidden}: {n_params:,} parameters "
          f"({n_params * 4 / GB:.2f} GB float32), {args.replicas} replica(s) x "
          f"{args.partitions} partitions, {args.shards} shards")
    try:
        trainer.start()
        trainer.life.begin(trainer)
        started = time.perf_counter()
        trainer.train()  # the real loop, without the final evaluation
        trained = time.perf_counter() - started
        report(trainer, n_params, trained, args.steps, started - begin)
    finally:
        trainer.close()


def report(trainer, n_params: int, seconds: float, steps: int, startup_s: float) -> None:
    stages = ray.get([s.info.remote() for s in trainer.session.stages])
    shards = ray.get([s.status.remote() for s in trainer.session.shards])
    print(f"start-up {startup_s:.1f} s; {steps} steps in {seconds:.1f} s "
          f"({seconds / steps:.2f} s per step)")
    print(f"{'actor':<22} {'parameters':>15} {'share':>6} {'peak memory':>12}")
    for info in stages:
        print(f"{'partition ' + str(info['partition']):<22} {info['params']:>15,} "
              f"{info['params'] / n_params:>6.1%} {info['peak_memory'] / GB:>9.2f} GB")
    for st in shards:
        print(f"{'shard ' + str(st['shard']):<22} {st['elements']:>15,} "
              f"{st['elements'] / n_params:>6.1%} {st['peak_memory'] / GB:>9.2f} GB")
    print(f"{'driver':<22} {'':>15} {'':>6} {peak_memory() / GB:>9.2f} GB")
    print(f"the whole model: {n_params * 4 / GB:.2f} GB of float32 values; shard updates "
          f"{[st['version'] for st in shards]}, all finite: {all(st['finite'] for st in shards)}")


if __name__ == "__main__":
    main()
