"""Single process, synchronous and asynchronous data parallelism on CIFAR-10, at equal images.

Each run trains the unchanged `cifar10-paper` recipe's ResNet-20 (batch 128 per replica, lr
0.1, momentum 0.9, wd 1e-4) on the real CIFAR-10 (channels-last) for --minibatches minibatches
of 128 in all:
the single process for that many iterations, `--mode sync --replicas 2` for half as many steps
(each a global batch of 256), Downpour with 2 replicas and 2 shards for that many minibatch
gradients over both replicas, once with each staleness rule in --rules, and once more with the
first rule and --fetch-wait-s 0 (the paper's replica, which never waits for a fetch). The
test error is evaluated every --eval-every minibatches. Prints the table; writes the run
directories under --out and two figures there (error against images and against wall time).
`--only NAME ...` runs those alone and reads the others back from --out where they finished.

    python benchmarks/bench_schemes_cifar.py --data-dir ../shared/data/cifar-10-batches-py \\
        [--minibatches 2000] [--out /tmp/schemes] [--rules none] [--only downpour-2x2-momentum]

Run it alone: every run takes the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def runs(args) -> list[tuple[str, list[str]]]:
    n, every = args.minibatches, args.eval_every
    common = ["--recipe", "cifar10-paper", "--data-dir", args.data_dir, "--quiet",
              "--checkpoint-every", "0", "--log-every", "50", "--channels-last"]
    downpour = [*common, "--mode", "downpour", "--replicas", "2", "--ps-shards", "2",
                "--iterations", str(n), "--eval-every", str(every)]
    return [("single", [*common, "--iterations", str(n), "--eval-every", str(every)]),
            ("sync-2", [*common, "--mode", "sync", "--replicas", "2", "--iterations",
                        str(n // 2), "--eval-every", str(every // 2)]),
            *[(f"downpour-2x2-{rule}", [*downpour, "--staleness-rule", rule])
              for rule in args.rules],
            (f"downpour-2x2-{args.rules[0]}-nowait",
             [*downpour, "--staleness-rule", args.rules[0], "--fetch-wait-s", "0"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--minibatches", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--out", default="/tmp/schemes")
    parser.add_argument("--rules", nargs="+", default=["momentum"],
                        help="a Downpour run with each of these staleness rules")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run these alone; read the others back from --out")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"# {platform.node()}, {os.cpu_count()} cores; cifar10-paper ResNet-20, "
          f"{args.minibatches} minibatches of 128 per run")
    rows = []
    for name, argv in runs(args):
        run = out / name
        if args.only and name not in args.only:
            if (run / "summary.json").is_file():
                rows.append((name, json.loads((run / "summary.json").read_text())))
            continue
        shutil.rmtree(run, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "distbelief", "train", *argv, "--out",
                               str(run)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        s = json.loads((run / "summary.json").read_text())
        rows.append((name, s))
    single = next((s for name, s in rows if name == "single"), None)
    print(f"{'run':<32} {'test error':>10} {'vs single':>9} {'images':>8} {'wall s':>7} "
          f"{'images/s':>8}")
    for name, s in rows:
        ratio = s["test_error"] / single["test_error"] if single else float("nan")
        print(f"{name:<32} {s['test_error']:>10.2%} {ratio:>9.3f} {s['examples']:>8} "
              f"{s['wall_s']:>7.0f} {s['images_per_s']:>8.0f}")
    dirs = [str(out / name) for name, _ in rows]
    for x in ("examples", "wall"):
        subprocess.run([sys.executable, "-m", "distbelief", "plot", *dirs, "--x", x, "-o",
                        str(out / f"errors-{x}.png"), "--title",
                        f"ResNet-20 on CIFAR-10, {args.minibatches} minibatches"], check=True)


if __name__ == "__main__":
    main()
