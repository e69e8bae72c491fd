"""A regression model under Downpour with the default momentum 0.9: test loss against the
single process's, over seeds.

scikit-learn's diabetes data (standardized, split 350 / 92), a 10-32-1 tanh MLP,
`distbelief.fit(..., loss="mse")` with batch 32, lr 0.02, momentum 0.9 (the default), 300
minibatches: the single process, then `mode="downpour"` with 2 replicas and 2 shards (real
Ray) under the default staleness rule. Prints each run's test loss and the ratio to the single
process's of the same seed (the issue's acceptance: within 1.2x).

    python benchmarks/bench_regression_downpour.py [--seeds 0 1 2] [--replicas 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import distbelief


def diabetes():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm[:350]], y[perm[:350]]), (x[perm[350:]], y[perm[350:]])


def run(seed: int, **settings) -> float:
    train, test = diabetes()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    summary = distbelief.fit(model, train, test_data=test, loss="mse", batch_size=32, lr=0.02,
                             iterations=300, eval_every=0, seed=seed, **settings)
    return summary["test_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    worst = 0.0
    for seed in args.seeds:
        single = run(seed)
        downpour = run(seed, mode="downpour", replicas=args.replicas, ps_shards=2)
        worst = max(worst, downpour / single)
        print(f"seed {seed}: single {single:.4f}, downpour {args.replicas}x2 {downpour:.4f} "
              f"({downpour / single:.3f}x)", flush=True)
    print(f"worst ratio {worst:.3f} (target 1.2: {'met' if worst <= 1.2 else 'not met'})")


if __name__ == "__main__":
    main()
