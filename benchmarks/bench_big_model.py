"""A model no single worker holds: a deep MLP of --hidden 15810 (1.0 billion parameters,
4.0 GB in float32) trained for a few Downpour steps with every replica cut into P partitions
and the server into K shards aligned to them, on this one machine.

Reported per partition actor and per shard: the parameters it holds, its private resident
memory at the end (its own tensors: a partition's values and gradients, a shard's slice) and
its peak resident memory (which also counts the pages of Ray's shared object store it touched:
the pushes and pulls), next to the model's total; the driver's; seconds per step. Each
partition should hold about 1/P of the parameters, each shard about 1/K.

What has to fit in the machine's memory is the server's copy (on the shards), each partition's
values and gradients, and the pushes and pulls in flight in Ray's object store. So momentum
and weight decay are off (the shards keep no optimizer state beside the values), shard
snapshots are off (--snapshot-every-s 0: no second copy of the server at the keeper), there is
no run directory and nothing is evaluated: after the start, where it initializes the values
once as the single-process trainer would, the driver never holds the whole model.

    python benchmarks/bench_big_model.py [--hidden 15810] [--partitions 4] [--shards 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import ray
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.runtime.cluster import memory
from distbelief.distributed.runtime.startup import start_ray
from distbelief.engine.config import TrainConfig

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=15810)
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
        snapshot_every_s=0.0, max_in_flight=1)
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
    print(f"{'actor':<14} {'parameters':>13} {'share':>6} {'private GB':>11} {'peak RSS GB':>12}")
    rows = [(f"partition {i['partition']}", i["params"], i["memory"]) for i in stages]
    rows += [(f"shard {st['shard']}", st["elements"], st["memory"]) for st in shards]
    rows.append(("driver", None, memory()))
    for name, count, mem in rows:
        held = "" if count is None else f"{count:>13,} {count / n_params:>6.1%}"
        print(f"{name:<14} {held:>20} {mem.get('private', 0) / GB:>11.2f} "
              f"{mem['peak'] / GB:>12.2f}")
    print(f"the whole model: {n_params * 4 / GB:.2f} GB of float32 values; shard updates "
          f"{[st['version'] for st in shards]}, all finite: {all(st['finite'] for st in shards)}")


if __name__ == "__main__":
    main()
