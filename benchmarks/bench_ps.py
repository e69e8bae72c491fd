"""Parameter-server push + pull throughput, and where a round trip's time goes.

A client in this process (the replicas' `RayClient`) pushes a gradient to K shard actors and
pulls the parameters back, all shards at once, as a replica does every step with
n_fetch = n_push = 1 (with a replica's source: under the default rule dana+lr each shard keeps
its momentum and serves it the look-ahead). The baseline is a plain in-process memory copy of
the same bytes (`torch.Tensor.copy_`), timed right after each round trip, so that both see the
machine in the same state (a baseline timed once, just after Ray started, ran up to 2x slow):

    ratio = (time to copy 2 x vector bytes in memory) / (time of one push + pull round trip)

1.0 would be a parameter server as fast as memcpy. Round trips are timed cold (the first ones)
and warm (after --warmup more: until Ray's object store has handed out all its memory once, so
that puts and pulls write pages their processes have touched before). Each push is put into
the object store once and the shards read their slices of it; each shard updates on
--ps-threads threads (default: the cores shared among the shards, since the client only
waits); --dtypes measures float32 and bfloat16 transfers (the memcpy baseline stays float32:
the bytes of the model).

Then, for the vector size given by --small (default: ResNet-20 on 8x8 digits, 272,474 floats),
the round trip is split into its parts: an empty actor call, putting the array into Ray's
object store, the shard's update, a pull, a push, and a push that returns the parameters in the
same call (what a replica sends when it fetches at the next step; also timed for the large
vector).

Last, snapshots off the hot path: the latency of sequential pushes to one shard that
snapshots every second (it copies its state between two pushes; a background thread sends the
copy to the keeper) against one that never does, p50 and p99 (goal: p99 <= 1.2x).

    python benchmarks/bench_ps.py [--floats 25000000] [--shards 1,2,4] [--rounds 7]
                                  [--dtypes float32,bfloat16] [--ps-threads N]
                                  [--warmup N]
                                  [--snapshot-sizes 272474,25000000] [--pushes 300]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import ray
import torch

from distbelief.distributed.downpour.actors import RayClient, ShardActor
from distbelief.distributed.downpour.shard import ParameterShard
from distbelief.distributed.runtime.startup import start_ray
from distbelief.distributed.runtime.session import DriverSession
from distbelief.engine.config import TrainConfig
from distbelief.distributed.wire import WIRE_DTYPES
from distbelief.optim import shard_bounds


def timed(fn, rounds: int) -> float:
    """Median seconds of `fn()` over `rounds` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_shards(values: torch.Tensor, count: int, config, session: DriverSession):
    bounds = shard_bounds(values.numel(), count)
    shards = [ShardActor.remote(k, lo, hi, values.numel(), config, session.keeper_name)
              for k, (lo, hi) in enumerate(bounds)]
    ray.get([s.start.remote(values[lo:hi].numpy()) for s, (lo, hi) in zip(shards, bounds)])
    return shards, bounds


def push_latency(values: torch.Tensor, every_s: float, pushes: int, session) -> list[float]:
    """Seconds of each of `pushes` sequential push round trips to one shard that snapshots
    every `every_s` seconds (copy between pushes, send from a background thread)."""
    config = TrainConfig().replace(lr=0.01, momentum=0.9, weight_decay=0.0,
                                   snapshot_every_s=every_s)
    shards, bounds = start_shards(values, 1, config, session)
    client, gradient = RayClient(shards, bounds), torch.randn(values.numel()) * 1e-3
    times = []
    for i in range(pushes + 5):  # 5 to warm up
        start = time.perf_counter()
        client.push(gradient, [0], 1, (), source=(0, "bench", i)).result()
        times.append(time.perf_counter() - start)
    sent = ray.get(shards[0].status.remote())["snapshots_sent"]
    ray.kill(shards[0])
    return times[5:], sent


def snapshot_cost(sizes: list[int], pushes: int, session) -> None:
    """Push latency with shard snapshots every second against none (snapshots off the hot
    path: the push waits only for the copy, not the transfer to the keeper)."""
    print(f"\npush round trip with shard snapshots every second vs none, {pushes} pushes, "
          f"1 shard:")
    print(f"{'floats':>12} {'snapshots':>10} {'sent':>5} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'p99 ratio':>9}")
    for n in sizes:
        values, p99_none = torch.randn(n), None
        for every in (1e9, 1.0):
            times, sent = push_latency(values, every, pushes, session)
            p50, p99 = (statistics.quantiles(times, n=100)[k] for k in (49, 98))
            p99_none = p99_none or p99
            print(f"{n:>12,} {'none' if every > 1e6 else 'every 1 s':>10} {sent:>5} "
                  f"{p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} {max(times) * 1e3:>8.2f} "
                  f"{p99 / p99_none:>9.3f}")


def threads_for(args, count: int) -> int:
    """--ps-threads, or the machine's cores shared among `count` shards (the client waits)."""
    return args.ps_threads or max(1, (os.cpu_count() or 1) // count)


def warmup_rounds(vector_bytes: int) -> int:
    """Round trips that would cycle the object store's memory once. Until it has been
    cycled, a new object lands at addresses the writing process has not touched yet, and its
    first write page-faults every 4 KiB: a 100 MB put costs 3-5 times a warm one (with the
    default store, 30% of RAM, for the first 10-40 round trips). A long run pays that once;
    the benchmark reports both."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    return min(100, int(store // (2 * vector_bytes)) + 5)


def round_trips(fn, baseline, warmup: int, rounds: int) -> tuple[float, float, float]:
    """(median of the first `rounds` round trips (cold store), median of `rounds` after
    `warmup` more (warm), median of `baseline` timed right after each warm one)."""
    def clock(f):
        start = time.perf_counter()
        f()
        return time.perf_counter() - start

    cold = [clock(fn) for _ in range(rounds)]
    for _ in range(warmup):
        fn()
    warm, base = [], []
    for _ in range(rounds):
        warm.append(clock(fn))
        base.append(clock(baseline))
    return statistics.median(cold), statistics.median(warm), statistics.median(base)


def measure(values, gradient, count: int, config, session, memcpy, warmup: int, rounds: int):
    """(cold, warm, warm memcpy, one call warm, its memcpy) seconds for `count` shards, pushes
    and fetches sent as a replica sends them: with its source, so that the shards keep its
    momentum and serve it the look-ahead under rule dana."""
    shards, bounds = start_shards(values, count, config, session)
    dtype = WIRE_DTYPES[config.downpour.ps_transfer_dtype]
    client, wire = RayClient(shards, bounds, dtype), gradient.to(dtype)  # Exchange._vector
    sequence = itertools.count(1)

    def push(pull=False):
        return client.push(wire, [0] * count, 1, (), pull=pull,
                           source=(0, "bench", next(sequence))).result()

    def round_trip():
        push()
        client.fetch(0).result()

    cold, warm, base = round_trips(round_trip, memcpy, warmup, rounds)
    # A push that precedes a fetch: one call that returns the values.
    _, one_call, base_one = round_trips(lambda: push(pull=True), memcpy, 0, rounds)
    for s in shards:
        ray.kill(s)
    return cold, warm, base, one_call, base_one


def throughput(args, config, session) -> None:
    """Push + pull of a large vector with 1, 2, 4 shards against an in-process memcpy, for each
    staleness rule and transfer dtype."""
    values, gradient = torch.randn(args.floats), torch.randn(args.floats) * 1e-3
    copy_target = torch.empty(args.floats)

    def memcpy():  # the bytes of a push and a pull, float32: the model's
        copy_target.copy_(values)
        copy_target.copy_(values)

    warmup = args.warmup if args.warmup >= 0 else warmup_rounds(args.floats * 4)
    print(f"vector: {args.floats:,} floats ({args.floats * 4 / 2**20:.0f} MiB); baseline: "
          f"in-process memcpy of push + pull bytes (float32, torch.copy_ on "
          f"{torch.get_num_threads()} threads) timed after each warm round trip; {warmup} "
          f"round trips between the cold and the warm medians of {args.rounds}")
    print(f"{'rule':>8} {'transfer':>9} {'shards':>6} {'threads':>7} {'memcpy ms':>9} "
          f"{'cold ms':>8} {'ratio':>6} {'warm ms':>8} {'ratio':>6} {'one call warm':>13} "
          f"{'ratio':>6}")
    for rule, dtype, count in itertools.product(args.rules.split(","), args.dtypes.split(","),
                                                [int(k) for k in args.shards.split(",")]):
        threads = threads_for(args, count)
        c = config.replace(staleness_rule=rule, ps_transfer_dtype=dtype, ps_threads=threads)
        cold, warm, base, one, base_one = measure(values, gradient, count, c, session, memcpy,
                                                  warmup, args.rounds)
        print(f"{rule:>8} {dtype:>9} {count:>6} {threads:>7} {base * 1e3:>9.1f} "
              f"{cold * 1e3:>8.1f} {base / cold:>6.3f} {warm * 1e3:>8.1f} {base / warm:>6.3f} "
              f"{one * 1e3:>13.1f} {base_one / one:>6.3f}")


def round_trip_parts(args, config, session) -> None:
    """Where the time of one round trip goes, for a replica-sized vector on one shard."""
    n = args.small
    small, small_grad = torch.randn(n), torch.randn(n) * 1e-3
    shards, bounds = start_shards(small, 1, config, session)
    client, shard = RayClient(shards, bounds), shards[0]
    local = ParameterShard(0, 0, n, n, small, config)
    rounds = max(args.rounds, 50)
    parts = {
        "empty actor call (status)": timed(lambda: ray.get(shard.status.remote()), rounds),
        "ray.put of the vector": timed(lambda: ray.put(small_grad.numpy()), rounds),
        "shard update in-process": timed(lambda: local.push(small_grad, local.version), rounds),
        "memcpy of the vector": timed(lambda: small.clone(), rounds),
        "pull round trip": timed(lambda: client.fetch().result(), rounds),
        "push round trip": timed(lambda: client.push(small_grad, [0], 1, ()).result(), rounds),
        "push + pull as one call": timed(
            lambda: client.push(small_grad, [0], 1, (), pull=True).result(), rounds),
    }
    print(f"\nround trip of {n:,} floats ({n * 4 / 2**20:.2f} MiB), 1 shard, median of "
          f"{rounds}:")
    for name, seconds in parts.items():
        print(f"  {name:<28} {seconds * 1e3:8.3f} ms")
    ray.kill(shard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floats", type=int, default=25_000_000)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="transfer dtypes (--ps-transfer-dtype) to measure")
    parser.add_argument("--rules", default="dana+lr,none",
                        help="staleness rules to measure (the default's, and plain SGD with "
                             "momentum, the paper's Downpour)")
    parser.add_argument("--ps-threads", type=int, default=0,
                        help="threads per shard (default: the cores shared among the shards)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=-1,
                        help="round trips between the cold and the warm medians (default: "
                             "until the object store has cycled once, at most 100)")
    parser.add_argument("--small", type=int, default=272_474)
    parser.add_argument("--snapshot-sizes", default="272474,25000000",
                        help="vector sizes for the snapshot cost (push latency)")
    parser.add_argument("--pushes", type=int, default=300)
    parser.add_argument("--only-snapshots", action="store_true")
    args = parser.parse_args()

    start_ray()
    session = DriverSession()
    session.start()  # the snapshot keeper (Ray runs already)
    # Snapshots off for the throughput: a 100 MB snapshot would land inside some rounds.
    config = TrainConfig().replace(lr=0.01, momentum=0.9, weight_decay=0.0, snapshot_every_s=1e9)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    if not args.only_snapshots:
        throughput(args, config, session)
        round_trip_parts(args, config, session)
    snapshot_cost([int(n) for n in args.snapshot_sizes.split(",")], args.pushes, session)
    session.close()


if __name__ == "__main__":
    main()
