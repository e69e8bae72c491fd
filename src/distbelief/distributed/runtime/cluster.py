"""The cluster as a run sees it: its nodes, where actors go (applying the decisions of
`distributed.placement`), waiting until they are placed, and releasing them."""

from __future__ import annotations

import sys

import ray
import torch

from distbelief.distributed.placement import SHARD_BUNDLE, Node, ReplicaShape, replica_shape
from distbelief.errors import DistbeliefError

START_TIMEOUT_S = 300  # replicas that cannot be placed (resources) fail the run after this


def node_id() -> str:
    """The node this process runs on."""
    return ray.get_runtime_context().get_node_id()


def memory() -> dict:
    """This process's memory in bytes: "peak" resident (VmHWM; it counts the pages of Ray's
    shared object store the process touched, so it overstates what the process owns) and
    "private" resident now (RssAnon: its own tensors and arrays). Linux; elsewhere the peak
    only."""
    import resource

    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss *
           (1 if sys.platform == "darwin" else 1024)}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["peak"] = int(fields["VmHWM"].split()[0]) * 1024
        out["private"] = int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return out


def nodes() -> list[Node]:
    """The cluster's live nodes and their CPUs and GPUs."""
    return [Node(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n["Alive"]]


def replica_options(config, count: int | None = None) -> tuple[dict, ReplicaShape]:
    """Ray options for the replicas of `config`, or `count` actors of that kind
    (`placement.replica_shape` on this cluster's nodes, spread over them, restarted up to
    --max-restarts, no task retries), and the shape."""
    shape = replica_shape(config, nodes(), count)
    return {"num_cpus": shape.num_cpus, "num_gpus": shape.num_gpus,
            "max_restarts": config.cluster.max_restarts, "max_task_retries": 0,
            "scheduling_strategy": "SPREAD"}, shape


def shard_placement(count: int, timeout_s: float = START_TIMEOUT_S) -> tuple[object, list]:
    """A placement group spreading `count` shards over the live nodes, and each shard's
    scheduling strategy. A bundle reserves no CPU (`placement.SHARD_BUNDLE`); when its node is
    lost Ray places the bundle on another node and restarts the shard there, which affinity to
    a node cannot do (hard affinity never leaves the node, and soft affinity spills even while
    the node is there: measured with Ray 2.60).

    Raises:
        DistbeliefError: the bundles could not be placed within `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([dict(SHARD_BUNDLE)] * count, strategy="SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise DistbeliefError(f"the {count} parameter-server shards could not be placed within "
                              f"{timeout_s} s (each reserves {SHARD_BUNDLE})")
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k)
                   for k in range(count)]


def remove_placement(group) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


def wait_started(replicas: list, shape: ReplicaShape,
                 timeout_s: float = START_TIMEOUT_S) -> list[dict]:
    """Every replica's `info()`, once all answer.

    Raises:
        DistbeliefError: naming the replicas that were not placed within `timeout_s`."""
    refs = [r.info.remote() for r in replicas]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        missing = [str(i) for i, ref in enumerate(refs) if ref not in ready]
        capacity = ", ".join(f"{n.cpus:g} CPUs" + (f" + {n.gpus:g} GPUs" if n.gpus else "")
                             for n in nodes())
        raise DistbeliefError(
            f"replica(s) {', '.join(missing)} of {len(refs)} not placed within {timeout_s} s: "
            f"each needs {shape.describe()}, the nodes have {capacity} and other work may "
            f"hold them (see --replica-cpus)")
    return ray.get(refs)


def granted_device() -> torch.device:
    """CUDA when Ray gave this process a GPU (a driver started as a Ray task or job with GPUs),
    else the CPU: a GPU taken outside Ray's accounting could be one a replica needs."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def kill(actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
