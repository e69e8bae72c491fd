"""Losing a whole node mid-run, on a Ray test cluster of three nodes on this machine
(`ray.cluster_utils.Cluster`): the shard and the replica it held restart on the other nodes,
and the run finishes, reporting what it lost."""

import pytest

from distbelief.distributed import DownpourTrainer
from distbelief.engine.rundir import read_jsonl
from distbelief.recipes import get_recipe
from support.cluster import three_nodes

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    with three_nodes() as cluster:
        yield cluster


def remove_a_node_when(trainer, cluster, steps: int, removed: list):
    """Once `steps` are done, remove a worker node holding a shard and a replica."""
    import threading
    import time

    def run():
        while trainer.steps < steps:
            time.sleep(0.05)
        shard_nodes = {st["node"] for st in ray.get([s.status.remote()
                                                     for s in trainer.session.shards])}
        replica_nodes = {r["node"] for r in trainer.placed}
        for node in cluster.worker_nodes:
            if node.node_id in shard_nodes & replica_nodes:
                removed.append((node.node_id, trainer.steps))
                cluster.remove_node(node)
                return

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.slow  # ~80 s; make test-all
def test_downpour_survives_the_loss_of_a_node_holding_a_shard_and_a_replica(cluster, tmp_path):
    run = tmp_path / "run"
    config = get_recipe("digits-downpour").replace(ps_shards=3, snapshot_every_s=0.5)
    trainer = DownpourTrainer(config, run, address=cluster.address)
    removed = []
    remove_a_node_when(trainer, cluster, 300, removed)
    summary = trainer.fit()
    assert removed, "no worker node held both a shard and a replica"
    # Learning after the loss, not the recipe's final accuracy: on three 1-CPU nodes with three
    # shards the staleness is ~6, and this run ended at 93-94% here (94% without the loss) but
    # at 61% on a loaded CI machine; how well Downpour converges under staleness is not this
    # test's subject (900 steps after the loss even recover from a slice restored as noise).
    # So: the test loss fell after the loss, and accuracy is well above chance (10%).
    # That the restored values are the snapshot's is checked in downpour/test_actors.py.
    records = read_jsonl(run / "metrics.jsonl")
    tests = {r["iteration"]: r for r in records if r["kind"] == "eval" and r["split"] == "test"}
    before = tests[max(i for i in tests if i <= removed[0][1])]
    assert summary["iterations"] == 1200, summary
    assert summary["test_loss"] < before["loss"] and summary["test_accuracy"] >= 0.3, {
        k: summary[k] for k in ("test_accuracy", "test_loss", "shard_failures",
                                "shard_updates_lost", "replica_failures", "staleness_mean")}
    assert summary["shard_failures"] >= 1 and summary["replica_failures"] >= 1
    failures = [r for r in records if r["kind"] == "failure"]
    shards = [f for f in failures if f["actor"].startswith("shard")]
    # The loss window is reported: the updates since the shard's last snapshot.
    assert shards and all(f["restored_version"] > 0 and f["updates_lost"] >= 0 for f in shards)
    assert summary["shard_updates_lost"] == sum(f["updates_lost"] for f in shards)
    assert max(summary["shard_updates"]) - min(summary["shard_updates"]) < 1200 / 10
