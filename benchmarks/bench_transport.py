"""Activations between two stage actors: Ray's object store (what the pipeline uses) against
Ray Direct Transport over gloo (`@ray.method(tensor_transport="gloo")`, the tensors sent
actor to actor through a collective group, only a reference through the object store); and
the two ways a stage hands on by itself: a Ray call carrying the array (`--pipeline-handoff
direct`) against a message of a gloo collective group (`collective`, `pipeline.link.Link`).

For each size: seconds per hand-off, the first actor making a float32 tensor and the second
reading it, the driver passing only the reference (the pipeline's pattern under `driver`),
averaged over --repeats after one warm-up. Then, inside the first actor: a call of the
second's method with the array, waited for (its answer is a float), against a `Link`
message there and back, halved; with the first actor's CPU time per hand-off. All are
measured in the same run.

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


@ray.remote(num_cpus=0)
class Linked:
    """A stage's side of the hand-offs it makes itself: through Ray calls or a `Link`."""

    def join(self, rank: int, group: str) -> None:
        import ray.util.collective as collective

        from distbelief.distributed.pipeline.link import Link

        collective.init_collective_group(2, rank, backend="gloo", group_name=group)
        self.link = Link(rank)

    def take(self, value) -> float:
        return float(value[-1])

    def by_call(self, other, n: int, repeats: int) -> tuple[float, float]:
        """(seconds, CPU seconds of this process) per call of `other.take` with the array."""
        array = np.ones(n, dtype=np.float32)
        ray.get(other.take.remote(array))
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            ray.get(other.take.remote(array))
        return ((time.perf_counter() - start) / repeats, (time.process_time() - cpu) / repeats)

    def by_link(self, n: int, repeats: int) -> tuple[float, float]:
        """Rank 0: (seconds, CPU seconds) per one-way `Link` hand-off, from messages there and
        back; rank 1 echoes (returns (0, 0))."""
        from distbelief.distributed.pipeline.relay import NEXT, PREVIOUS

        rank, tensor = self.link.rank, torch.ones(n)
        start = cpu = 0.0
        for i in range(repeats + 1):
            if i == 1:
                start, cpu = time.perf_counter(), time.process_time()
            if rank == 0:
                self.link.send(NEXT, (i, "F", 0), tensor)
                self.link.take((i, "B", 0))
            else:
                self.link.send(PREVIOUS, (i, "B", 0), self.link.take((i, "F", 0)))
            self.link.begin(i + 1)
        if rank == 1:
            return 0.0, 0.0
        return ((time.perf_counter() - start) / repeats / 2,
                (time.process_time() - cpu) / repeats / 2)


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
    linked = [Linked.remote(), Linked.remote()]
    ray.get([a.join.remote(rank, "bench-transport") for rank, a in enumerate(linked)])
    print("a stage handing on by itself (ms per hand-off; CPU ms of the sender's process):")
    print(f"{'MiB':>8} {'Ray call':>9} {'(CPU)':>6} {'gloo group':>11} {'(CPU)':>6} "
          f"{'call / group':>13}")
    for size in (64 << 10, 1 << 20, 4 << 20, 16 << 20):
        n = size // 4
        (call, call_cpu), = ray.get([linked[0].by_call.remote(linked[1], n, args.repeats)])
        (link, link_cpu), _ = ray.get([a.by_link.remote(n, args.repeats) for a in linked])
        print(f"{size / 2**20:>8.2f} {call * 1e3:>9.2f} {call_cpu * 1e3:>6.2f} "
              f"{link * 1e3:>11.2f} {link_cpu * 1e3:>6.2f} {call / link:>13.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
