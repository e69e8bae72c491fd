"""Sandblaster L-BFGS: backup tasks against a straggler, and the coordinator's overhead.

--straggler: R replicas compute the batch gradient of an MLP (3072-256-10, 789K parameters) on
synthetic 3x32x32 images, one batch of B images cut into P portions, with the fixed-step line
search (one batch gradient per iteration). Three runs in one Ray session: no straggler; replica
0 slowed 10x (it sleeps 9x the mean portion time of the first run after each portion) with
backup tasks; the same without. Reported: mean seconds per batch gradient (iteration 0, the
first fetch, excluded) and the ratio to the no-straggler run. The paper's claim is that load
balancing plus backup tasks make a straggler cost little; with R replicas one 10x slower the
best possible is R / (R - 0.9) of the no-straggler time.

--overhead: the same MLP widened to 8136 hidden units (25.08M parameters) with the strong-Wolfe
line search and history 10; per L-BFGS iteration, the seconds spent in shard commands (the
coordinator's dot products, axpys, copies and history updates, all on the shards) against the
seconds spent computing batch gradients (replicas fetching x, computing portions, pushing).

    python benchmarks/bench_sandblaster.py [--straggler] [--overhead] [--replicas 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from distbelief.distributed import SandblasterTrainer
from distbelief.distributed.runtime.startup import start_ray
from distbelief.engine.rundir import read_jsonl
from distbelief.recipes import get_recipe


def base(**kw):
    settings = dict(recipe="bench", model="mlp", data="synthetic", synthetic_size=8192,
                    synthetic_shape=(3, 32, 32), device="cpu", eval_every=0,
                    checkpoint_every=0, log_every=1000, replica_cpus=1)
    return get_recipe("digits-sandblaster").replace(**{**settings, **kw})


def run(config) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = SandblasterTrainer(config, Path(tmp) / "run").fit()
        records = [r for r in read_jsonl(Path(tmp) / "run/metrics.jsonl")
                   if r.get("kind") == "train" and r["iteration"] > 0]
    return summary, records


def straggler(args) -> None:
    c = base(replicas=args.replicas, ps_shards=2, batch_size=0, portions=args.portions,
             line_search="none", lr=0.1, iterations=args.iterations)
    images = c.synthetic.synthetic_size // args.portions
    print(f"\n## straggler: {args.replicas} replicas (1 thread each), 2 shards, mlp 789K params,"
          f" batch {c.synthetic.synthetic_size} in {args.portions} portions of {images}, "
          f"{args.iterations} batches each")
    summary, records = run(c)
    per_batch = statistics.mean(r["gradient_s"] for r in records)
    portion_s = per_batch * args.replicas / args.portions  # replica-seconds per portion
    delay = 9 * portion_s
    print(f"mean portion time {portion_s * 1000:.1f} ms, so the straggler sleeps "
          f"{delay * 1000:.0f} ms after each")
    print(f"{'run':<38} {'s/batch':>8} {'ratio':>6} {'backups':>8} {'wasted':>7}  "
          f"portions per replica")
    print(f"{'no straggler':<38} {per_batch:>8.3f} {1:>6.2f} {summary['backup_tasks']:>8} "
          f"{summary['backup_wasted']:>7}  {summary['portions_per_replica']}")
    for name, backup in (("replica 0 slowed 10x, backup tasks", True),
                         ("replica 0 slowed 10x, no backup tasks", False)):
        summary, records = run(c.replace(straggler_delay=delay, backup_tasks=backup))
        t = statistics.mean(r["gradient_s"] for r in records)
        print(f"{name:<38} {t:>8.3f} {t / per_batch:>6.2f} {summary['backup_tasks']:>8} "
              f"{summary['backup_wasted']:>7}  {summary['portions_per_replica']}")
    print(f"(bound for {args.replicas} replicas on separate machines: "
          f"{args.replicas / (args.replicas - 0.9):.2f})")


def overhead(args) -> None:
    print(f"\n## coordinator overhead: mlp 3072-8136-10 (25.08M parameters), strong Wolfe, "
          f"history 10, 2 replicas, batch {args.overhead_batch}")
    print(f"{'shards':>6} {'s/iteration':>12} {'shard cmds s':>13} {'gradients s':>12} "
          f"{'cmds/gradient':>14} {'calls/it':>9}")
    for shards in map(int, args.shards.split(",")):
        c = base(model="mlp", hidden=8136, replicas=2, ps_shards=shards,
                 synthetic_size=args.overhead_batch, batch_size=0, portions=8,
                 iterations=args.overhead_iterations, lr=1.0, line_search="strong_wolfe",
                 history=10, weight_decay=1e-4)
        summary, records = run(c)
        # Iterations 1..m only fill the history; later ones do the full two-loop recursion.
        seconds = statistics.mean(r["seconds"] for r in records)
        cmds = statistics.mean(r["coordinator_s"] for r in records)
        grads = statistics.mean(r["gradient_s"] for r in records)
        calls = summary["coordinator_calls"] / max(1, summary["iterations"])
        print(f"{shards:>6} {seconds:>12.2f} {cmds:>13.2f} {grads:>12.2f} "
              f"{cmds / grads:>14.2f} {calls:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--straggler", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--portions", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--shards", default="1,2")
    parser.add_argument("--overhead-batch", type=int, default=512)
    parser.add_argument("--overhead-iterations", type=int, default=14)
    args = parser.parse_args()
    if not (args.straggler or args.overhead):
        args.straggler = args.overhead = True
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, ray {ray.__version__}")
    start_ray()
    try:
        if args.straggler:
            straggler(args)
        if args.overhead:
            overhead(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
