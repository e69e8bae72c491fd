"""How big each replica is: decisions only, no Ray here (`runtime.cluster` asks Ray for the
nodes and applies them; the shards are spread by a placement group,
`runtime.cluster.shard_placement`).

Replicas reserve CPUs (and GPUs) so that Ray never packs more of them onto a node than its cores
can run; each uses as many threads as it reserved. The share is sized to the nodes, not to the
cluster's total: two replicas on four nodes of 16 CPUs take 16 each (one node apiece), not 32,
which no node has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distbelief.errors import ConfigError

RESOURCE_UNIT = 1e-4  # Ray's granularity for fractional resources
# What each parameter-server shard reserves: memory only (its slice lives there), no CPU, so
# that the replicas' CPU shares are not cut; see runtime.cluster.shard_placement.
SHARD_BUNDLE = {"memory": 1 << 20}


@dataclass(frozen=True)
class Node:
    id: str
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ReplicaShape:
    """What each replica reserves from Ray and uses."""

    num_cpus: float
    num_gpus: float
    threads: int
    device: str  # "cuda" or "cpu"

    def describe(self) -> str:
        gpus = f" and {self.num_gpus:g} GPUs" if self.num_gpus else ""
        return f"{self.num_cpus:g} CPUs{gpus}"


def fits(capacities: list[float], share: float) -> int:
    """How many actors reserving `share` each fit on nodes of these capacities."""
    return sum(math.floor(c / share + 1e-9) for c in capacities)


def largest_share(capacities: list[float], count: int, cap: float) -> float:
    """The largest share s <= `cap` such that `count` actors of s fit on the nodes: a whole
    number when one fits, else a fraction (several actors share a CPU). 0 if none fits."""
    for whole in range(int(cap), 0, -1):
        if fits(capacities, whole) >= count:
            return float(whole)
    low, high = 0.0, min(cap, 1.0)
    for _ in range(60):  # fits() falls as the share grows: bisect for the largest that fits
        middle = (low + high) / 2
        low, high = (middle, high) if fits(capacities, middle) >= count else (low, middle)
    return math.floor(low / RESOURCE_UNIT) * RESOURCE_UNIT


def replica_shape(config, nodes: list[Node], count: int | None = None) -> ReplicaShape:
    """Each replica's reservation for `config` on these nodes (or each of `count` actors:
    default the replicas): GPUs when the config asks for them (or `auto` finds some), as many
    CPUs as every one can have at once, and `--replica-cpus` threads (default: what it
    reserved, at least one).

    Raises:
        ConfigError: --device cuda on a cluster without GPUs; --replica-cpus beyond the
            CPUs of every node."""
    replicas, requested = count or config.cluster.replicas, config.cluster.replica_cpus
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if config.device == "cuda" and not gpu_nodes:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs")
    use_gpu = bool(gpu_nodes) and config.device != "cpu"
    # A replica needs its CPUs and its GPU on the same node: with GPUs, count GPU nodes only.
    where = gpu_nodes if use_gpu else nodes
    cpus = [n.cpus for n in where]
    if requested and requested > max(cpus, default=0):
        # More threads than a node has cores would only time-slice them (and slow a stop).
        raise ConfigError(f"--replica-cpus {requested} exceeds the {max(cpus, default=0):g} "
                          f"CPUs of the largest {'GPU ' if use_gpu else ''}node")
    cpu_share = largest_share(cpus, replicas, requested or max(cpus, default=1.0)) or \
        RESOURCE_UNIT
    gpu_share = largest_share([n.gpus for n in where], replicas, 1.0) if use_gpu else 0.0
    threads = requested or max(1, int(cpu_share))
    return ReplicaShape(cpu_share, gpu_share, threads, "cuda" if use_gpu else "cpu")
