"""Downpour SGD images/s with N replicas against the single-process trainer on the same cores.

All runs train the digits recipe's ResNet-20 (batch 64, channels-last) on this machine for
--steps minibatches in all (Downpour: over all replicas together, n_fetch = n_push = 1 unless
--amortize adds a run with n_fetch = n_push = 4). Downpour runs on a local Ray sized to the
machine, 2 shards; the replicas share the cores (threads = cores / replicas). Reported:
images/s of the training loop (start-up and the final evaluation excluded) and the ratio to the
single-process trainer measured in the same run, plus where a replica's time went.

--staleness-rules runs each Downpour configuration under each rule named (default: the default,
dana+lr; "dana+lr,momentum" compares it with a rule whose shard keeps one momentum vector).

    python benchmarks/bench_downpour.py [--steps 600] [--replicas 1,2] [--amortize]
                                        [--staleness-rules dana+lr,momentum]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import ray
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.runtime.startup import start_ray
from distbelief.engine import Trainer
from distbelief.recipes import get_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--amortize", action="store_true",
                        help="also run 2 replicas with n_fetch = n_push = 4")
    parser.add_argument("--staleness-rules", default="dana+lr")
    args = parser.parse_args()
    base = get_recipe("digits").replace(iterations=args.steps, milestones=(args.steps,),
                                        eval_every=0, checkpoint_every=0, log_every=50,
                                        device="cpu")
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, ray {ray.__version__}; resnet20 on digits, batch 64, "
          f"{args.steps} steps")
    trainer = Trainer(base)
    trainer.train_until(20)  # warm-up: first-step allocations
    start = time.perf_counter()
    trainer.train_until(20 + args.steps)
    single = args.steps * base.batch_size / (time.perf_counter() - start)
    print(f"{'run':<44} {'images/s':>9} {'ratio':>6}  replica time: compute / waiting / other")
    print(f"{'single process':<44} {single:>9.0f} {1:>6.3f}")
    start_ray()
    runs = [(f"downpour {n} replica(s), 2 shards", {"replicas": n})
            for n in map(int, args.replicas.split(","))]
    if args.amortize:
        runs.append(("downpour 2 replicas, n_fetch=n_push=4",
                     {"replicas": 2, "n_fetch": 4, "n_push": 4}))
    rules = args.staleness_rules.split(",")
    runs = [(f"{name}, {rule}" if len(rules) > 1 else name, {**settings, "staleness_rule": rule})
            for name, settings in runs for rule in rules]
    for name, settings in runs:
        config = base.replace(mode="downpour", ps_shards=2, momentum=0.5, **settings)
        t = DownpourTrainer(config)
        summary = t.fit()
        spent = sum(t.progress.replica_seconds)
        parts = t.progress.time_split
        waiting = parts["fetch_wait_s"] + parts["push_wait_s"]
        print(f"{name:<44} {summary['images_per_s']:>9.0f} "
              f"{summary['images_per_s'] / single:>6.3f}  "
              f"{parts['compute_s'] / spent:.0%} / "
              f"{waiting / spent:.0%} / {1 - (parts['compute_s'] + waiting) / spent:.0%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
