"""How big each replica is and where it goes, decided from the nodes (no Ray)."""

import pytest

from distbelief.distributed.placement import Node, fits, largest_share, replica_shape
from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe


def shape(nodes, **kw):
    return replica_shape(get_recipe("digits-downpour").replace(**kw), nodes)


def cpus(*counts, gpus=0.0):
    return [Node(f"n{i}", c, gpus) for i, c in enumerate(counts)]


def test_fewer_replicas_than_nodes_take_a_node_each_not_the_cluster_s_share():
    """Sizing from cluster-wide CPUs asked 32 CPUs per replica here, which no node has."""
    s = shape(cpus(16, 16, 16, 16), replicas=2)
    assert (s.num_cpus, s.threads, s.num_gpus, s.device) == (16, 16, 0, "cpu")
    assert fits([16] * 4, s.num_cpus) >= 2


@pytest.mark.parametrize("nodes, replicas, reserved, threads", [
    ((2,), 1, 2, 2), ((2,), 2, 1, 1),
    ((16, 4), 3, 5, 5),  # 5 + 5 + 5 on the big node beats 4 each
    ((1, 1, 1), 2, 1, 1)])
def test_each_replica_gets_the_most_cpus_that_all_of_them_can_have(nodes, replicas, reserved,
                                                                   threads):
    s = shape(cpus(*nodes), replicas=replicas)
    assert (s.num_cpus, s.threads) == (reserved, threads)
    assert fits(list(nodes), s.num_cpus) >= replicas
    assert fits(list(nodes), s.num_cpus + 1) < replicas


def test_more_replicas_than_cpus_share_them():
    s = shape(cpus(2), replicas=3)
    assert 0.66 <= s.num_cpus < 2 / 3 and s.threads == 1
    assert fits([2], s.num_cpus) >= 3
    assert largest_share([2], 3, 4.0) == s.num_cpus


def test_replica_cpus_sets_the_threads_and_reserves_what_fits():
    s = shape(cpus(2), replicas=2, replica_cpus=2)
    assert (s.num_cpus, s.threads) == (1, 2)
    assert shape(cpus(2, 8), replicas=1, replica_cpus=8).threads == 8  # the larger node


def test_replica_cpus_beyond_every_node_is_refused():
    # 64 threads on 2 cores only time-slice them (and a SIGTERM waited minutes for a step).
    with pytest.raises(ConfigError, match="--replica-cpus 3 exceeds the 2 CPUs of the largest "
                                          "node"):
        shape(cpus(2, 2), replicas=1, replica_cpus=3)


def test_gpus_when_the_cluster_has_them_unless_the_cpu_is_asked_for():
    nodes = cpus(8, 8, gpus=1.0) + cpus(32)
    s = shape(nodes, replicas=3)
    assert s.device == "cuda" and s.num_gpus == 0.5  # 2 GPU nodes, 3 replicas
    assert s.num_cpus == 4  # only the GPU nodes count for the CPUs
    assert shape(nodes, replicas=3, device="cpu").device == "cpu"
    with pytest.raises(ConfigError, match="--device cuda but the Ray cluster has no GPUs"):
        shape(cpus(8), replicas=1, device="cuda")
