"""Downpour at 4, 8 and 16 replicas against the single process, at equal minibatches.

Runs the CLI (one subprocess per run, so each has the machine to itself): the single process,
then `--mode downpour --lockstep --replicas N` for each N of --replicas (staleness exactly
N - 1, no timing noise), and with --ray N also real Ray replicas, all on the same recipe,
minibatches and flags; with --large-batch N, one process taking N minibatches as one step
(the large-batch bound: the same images without staleness). Prints, per run, the training
error of the last training record, the final test error and both as ratios to the single
process's, with the mean staleness.

    python benchmarks/bench_downpour_scale.py --data-dir ../shared/data/cifar-10-batches-py \\
        [--recipe cifar10-paper] [--iterations 2000] [--replicas 4 8 16] [--ray 4] \\
        [--large-batch 4 8 16] [--out /tmp/downpour-scale] \\
        [--downpour-flags "--staleness-rule dana --async-warmup 500"] [-- extra train flags
        for every run, e.g. --bn-recalibrate 100]

Run it alone: every run takes the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def train(run: Path, args, flags: list[str]) -> dict:
    """One CLI run into `run` (replaced); its summary with the last training error added."""
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "-m", "distbelief", "train", "--recipe", args.recipe,
               "--iterations", str(args.iterations), "--eval-every", "0",
               "--checkpoint-every", "0", "--out", str(run), "--quiet", *flags]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary["last_train_error"] = [r for r in records if r["kind"] == "train"][-1]["error"]
    summary["seconds"] = time.perf_counter() - start
    return summary


def large_batch(args, n: int) -> list[str]:
    """The flags of one process doing N replicas' minibatches as one step (`--large-batch`):
    the same images, N times fewer steps, the lr scaled by N after a linear warmup from the
    recipe's (Goyal et al., 2017), the training window of the same number of images."""
    from distbelief.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    steps = args.iterations // n
    return ["--iterations", str(steps), "--batch-size", str(recipe.batch_size * n),
            "--lr", str(recipe.lr * n), "--warmup-iterations", str(steps // 4),
            "--warmup-mode", "linear", "--warmup-lr", str(recipe.lr),
            "--log-every", str(max(1, 100 // n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar10-paper")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--replicas", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--ray", type=int, nargs="*", default=[])
    parser.add_argument("--ps-shards", type=int, default=2)
    parser.add_argument("--large-batch", type=int, nargs="*", default=[],
                        help="for each N: one process at batch 128 x N for iterations / N "
                             "steps, lr x N after a linear warmup over a quarter of them: "
                             "what a synchronous step over N replicas' minibatches does "
                             "with the same images (the large-batch bound)")
    parser.add_argument("--downpour-flags", default="",
                        help="flags for the Downpour runs only (lockstep and Ray), one string")
    parser.add_argument("--out", type=Path, default=Path("/tmp/downpour-scale"))
    parser.add_argument("extra", nargs="*", help="flags for every run, after --")
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
          f"{args.recipe}, {args.iterations} minibatches, flags {args.extra}, downpour flags "
          f"{args.downpour_flags!r}", flush=True)
    downpour = shlex.split(args.downpour_flags)
    runs = [("single", [])]
    runs += [(f"lockstep {n}", ["--mode", "downpour", "--lockstep", "--replicas", str(n),
                                "--ps-shards", str(args.ps_shards), *downpour])
             for n in args.replicas]
    runs += [(f"ray {n}x{args.ps_shards}", ["--mode", "downpour", "--replicas", str(n),
                                            "--ps-shards", str(args.ps_shards), *downpour])
             for n in args.ray]
    runs += [(f"batch x{n}", large_batch(args, n)) for n in args.large_batch]
    base = None
    for name, flags in runs:
        s = train(args.out / name.replace(" ", "-"), args, [*flags, *args.extra])
        base = base or s
        print(f"{name:>14}: train error {s['last_train_error']:.4f} "
              f"({s['last_train_error'] / base['last_train_error']:.3f}x), test error "
              f"{s['test_error']:.4f} ({s['test_error'] / base['test_error']:.3f}x), "
              f"staleness {s.get('staleness_mean', 0):.2f}, {s['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
