"""Activations between two stage actors: Ray's object store (what the pipeline uses) against
Ray Direct Transport over gloo (`@ray.method(tensor_transport="gloo")`, the tensors sent
actor to actor through a collective group, only a reference through the object store).

For each size: seconds per hand-off, the first actor making a float32 tensor and the second
reading it, the driver passing only the reference (the pipeline's pattern), averaged over
--repeats after one warm-up. Both sides are measured in the same run.

    python benchmarks/bench_transport.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import ray
import torch
from ray.experimental.collective import create_collective_group


@ray.remote(num_cpus=0)
class Stage:
    def make_array(self, n: int) -> np.ndarray:  # the object store: a numpy array
        return np.ones(n, dtype=np.float32)

    @ray.method(tensor_transport="gloo")
    def make_tensor(self, n: int) -> torch.Tensor:  # gloo: a torch tensor
        return torch.ones(n)

    def take(self, value) -> float:
        return float(value[-1])


def hand_off_s(make, take, n: int, repeats: int) -> float:
    ray.get(take.remote(make.remote(n)))
    start = time.perf_counter()
    for _ in range(repeats):
        ray.get(take.remote(make.remote(n)))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    first, second = Stage.remote(), Stage.remote()
    create_collective_group([first, second], backend="gloo")
    print(f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; {time.strftime('%Y-%m-%d')}; one node, float32")
    print(f"{'MiB':>8} {'object store ms':>16} {'gloo ms':>9} {'gloo / store':>13}")
    for size in (64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20):
        n = size // 4
        store = hand_off_s(first.make_array, second.take, n, args.repeats)
        gloo = hand_off_s(first.make_tensor, second.take, n, args.repeats)
        print(f"{size / 2**20:>8.2f} {store * 1e3:>16.2f} {gloo * 1e3:>9.2f} "
              f"{gloo / store:>13.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
