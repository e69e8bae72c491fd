"""Pipeline efficiency: a replica cut into P partitions on P cores (one thread each) against one
process on the same P cores, for M micro-batches per batch, with the measured bubble against
GPipe's ideal (P - 1) / (M + P - 1); and the time to move boundary activations of each size
between two actors through Ray, against the bytes.

All runs train --model (ResNet-20) on synthetic 3x32x32 images (batch --batch, no
evaluation) for --steps steps after a warm-up; images/s of the training loop and the ratio to
the single process measured in the same run, and that ratio as a share of the ideal
M / (M + P - 1) ("of ideal"). Each schedule (--schedules: gpipe, 1f1b:K with --pipeline-ahead K,
1f1b:K+recompute; any of them @driver or @collective for that --pipeline-handoff, ~W for a
cut with W multiply-adds per kept element, `partition.ACTIVATION_COST`, #UNIT[/UNIT...] for
--partition-at) is run at each M, with
each partition's peak activation bytes held for backward. With --rounds R every run is
measured R times, the single process before the first and after each run (this machine's
speed drifts by minutes), each run's ratio against the mean of the single process on either
side of it, and the medians reported, the ratio's median of the per-round ratios.

    python benchmarks/bench_pipeline.py [--model resnet20] [--partitions 2] [--micro 1,2,4,8]
        [--steps 30] [--schedules gpipe,1f1b:0,1f1b:1,1f1b:1+recompute] [--rounds R]
        [--micro-size S]

With --micro-size S every run's batch is M x S (the single process's is --batch): the
activations a partition holds then depend on the schedule and M alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time

import numpy as np
import ray
import torch

from distbelief.distributed.pipeline import PipelineTrainer
from distbelief.distributed.runtime.startup import start_ray
from distbelief.engine import Trainer
from distbelief.engine.config import TrainConfig

partition = importlib.import_module("distbelief.distributed.pipeline.partition")  # the module


def images_per_s(trainer: Trainer, steps: int) -> float:
    trainer.train_until(trainer.iteration + 3)  # warm-up: allocations, first transfers
    start = time.perf_counter()
    trainer.train_until(trainer.iteration + steps)
    return steps * trainer.config.batch_size / (time.perf_counter() - start)


@ray.remote(num_cpus=0)
class Sender:
    def make(self, n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)


@ray.remote(num_cpus=0)
class Receiver:
    def take(self, array: np.ndarray) -> float:
        return float(array[-1])


def transfer_times(sizes: list[int], repeats: int = 20) -> list[tuple[int, float]]:
    """Seconds to hand an array from one actor to another (made by the first, read by the
    second, the driver passing only the reference), per size in bytes."""
    sender, receiver = Sender.remote(), Receiver.remote()
    out = []
    for size in sizes:
        ray.get(receiver.take.remote(sender.make.remote(size // 4)))
        start = time.perf_counter()
        for _ in range(repeats):
            ray.get(receiver.take.remote(sender.make.remote(size // 4)))
        out.append((size, (time.perf_counter() - start) / repeats))
    return out


def parse_schedule(text: str) -> tuple[str, int, bool, str, int, str]:
    """"1f1b:1+recompute@driver~96#layer2.1" -> ("1f1b", 1, True, "driver", 96, "layer2.1"):
    the schedule, --pipeline-ahead (default 1), --recompute, --pipeline-handoff (default
    direct), the partitioner's cost of a kept element (default `partition.ACTIVATION_COST`)
    and --partition-at (default: the balanced cut; units joined by "/")."""
    text, _, at = text.partition("#")
    text, _, cost = text.partition("~")
    text, _, handoff = text.partition("@")
    text, _, recompute = text.partition("+")
    name, _, ahead = text.partition(":")
    return (name, int(ahead or 1), bool(recompute), handoff or "direct",
            int(cost or partition.ACTIVATION_COST), at.replace("/", ","))


def pipeline_rate(base: TrainConfig, p: int, m: int, schedule: str, batch: int, steps: int
                  ) -> tuple[float, dict]:
    """images/s of one partitioned run (started, warmed up, measured, closed) and its last
    training record's pipeline metrics."""
    name, ahead, recompute, handoff, cost, at = parse_schedule(schedule)
    partition.ACTIVATION_COST, default = cost, partition.ACTIVATION_COST  # the driver cuts
    trainer = PipelineTrainer(base.replace(partitions=p, micro_batches=m, pipeline_schedule=name,
                                           pipeline_ahead=ahead, batch_size=batch,
                                           recompute=recompute, pipeline_handoff=handoff,
                                           partition_at=at))
    trainer.start()
    partition.ACTIVATION_COST = default
    try:
        rate = images_per_s(trainer, steps)
        return rate, trainer.life.last_train["pipeline"]  # the measured steps' window
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--micro", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--schedules", default="gpipe,1f1b:0,1f1b:1,1f1b:1+recompute",
                        help="NAME[:AHEAD][+recompute][@HANDOFF][~W][#UNIT/...], comma-separated "
                             "(HANDOFF: direct, the default, collective or driver)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the single process and every run this many times, "
                             "alternating; report the medians")
    parser.add_argument("--micro-size", type=int, default=0,
                        help="images per micro-batch (batch M x this); 0: --batch for all")
    parser.add_argument("--channels-last", action="store_true",
                        help="every run (the single process too) in channels-last memory format")
    args = parser.parse_args()
    p = args.partitions
    base = TrainConfig().replace(
        recipe="bench", model=args.model, data="synthetic", synthetic_size=4096,
        batch_size=args.batch, iterations=10_000, eval_every=0, checkpoint_every=0,
        log_every=10_000, device="cpu", channels_last=args.channels_last, replica_cpus=1)
    print(f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; {time.strftime('%Y-%m-%d')}; {args.model}, synthetic 3x32x32, "
          f"batch {args.batch}, {args.steps} steps, {p} partitions of 1 thread each, "
          f"medians of {args.rounds} alternating round(s)")
    threads = torch.get_num_threads()
    single_trainer = Trainer(base)
    start_ray()
    runs = [(m, schedule) for m in map(int, args.micro.split(","))
            for schedule in args.schedules.split(",")]
    singles, rates, metrics = [], {run: [] for run in runs}, {}

    def measure_single() -> float:
        torch.set_num_threads(p)  # the single process gets the partitions' cores
        singles.append(images_per_s(single_trainer, args.steps))
        torch.set_num_threads(threads)
        return singles[-1]

    before = measure_single()
    for _ in range(args.rounds):
        for m, schedule in runs:
            batch = m * args.micro_size if args.micro_size else args.batch
            rate, metrics[(m, schedule)] = pipeline_rate(base, p, m, schedule, batch,
                                                         args.steps)
            after = measure_single()  # each run against the single process on either side
            rates[(m, schedule)].append((rate, 2 * rate / (before + after)))
            before = after
    single = float(np.median(singles))
    print(f"{'run':<34} {'images/s':>9} {'ratio':>6} {'of ideal':>8} {'bubble':>7} "
          f"{'ideal':>6}")
    print(f"{'single process, ' + str(p) + ' threads':<34} {single:>9.0f} {1:>6.2f}   "
          f"rounds {[round(r) for r in singles]}")
    for (m, schedule), measured in rates.items():
        rate, ratio = (float(np.median([r[k] for r in measured])) for k in (0, 1))
        pipe, ideal = metrics[(m, schedule)], (p - 1) / (m + p - 1)
        batch = m * args.micro_size if args.micro_size else args.batch
        peak = [round(b / 2**20, 1) for b in pipe["peak_activation_bytes"]]
        print(f"{f'{p} partitions x {m} micro, {schedule}':<34} {rate:>9.0f} "
              f"{ratio:>6.2f} {ratio / (1 - ideal):>8.2f} "
              f"{pipe['bubble']:>7.2f} {ideal:>6.2f}   peak activations MiB {peak}, "
              f"compute s per partition {pipe['compute_s']}, "
              f"batch {batch}, ratios {[round(r[1], 2) for r in measured]}")
    print("boundary activations between two actors through Ray:")
    for size, seconds in transfer_times([64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]):
        print(f"  {size / 2**20:>7.2f} MiB  {seconds * 1e3:>7.2f} ms  "
              f"{size / seconds / 2**30:>6.2f} GiB/s")


if __name__ == "__main__":
    main()
