"""Downpour with partitioned replicas on a local Ray: each partition an actor talking only to
the shards of its part. One replica without overlap is plain SGD (equal to the trainer); two
replicas of two partitions learn digits as two whole replicas do; a partition killed mid-run
fails its replica's chunk, Ray restarts it from the server's values and the run completes."""

import threading
import time

import pytest
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.engine import Trainer, load_checkpoint
from distbelief.engine.rundir import read_jsonl
from distbelief.recipes import get_recipe
from support.downpour import digits_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_one_partitioned_replica_without_overlap_equals_the_trainer(tmp_path):
    c = digits_config(iterations=12, milestones=(6,), log_every=4, eval_every=0,
                      checkpoint_every=0, channels_last=False, replicas=1, ps_shards=3,
                      partitions=2, replica_cpus=1, staleness_rule="momentum")
    trainer = DownpourTrainer(c, tmp_path / "run")
    summary = trainer.fit()
    assert summary["shard_partitions"] == [0, 1, 1] and summary["shard_updates"] == [12] * 3
    assert summary["staleness"] == {0: 36}  # never stale: no overlap, one replica
    cluster = next(r for r in read_jsonl(tmp_path / "run/metrics.jsonl")
                   if r["kind"] == "cluster")
    (replica,) = cluster["replicas"]
    held = [p["params"] for p in replica["partitions"]]
    assert held == [p.params for p in trainer.plan.parts] and 0 < min(held)  # its part only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each partition: CPU kernels sum by thread count
    try:
        reference = Trainer(c.replace(mode="single", partitions=1))
        reference.train_until(12)
    finally:
        torch.set_num_threads(threads)
    server = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(server[name].float(), value.float(), rtol=0, atol=1e-6,
                                   msg=name)


def test_a_partitioned_run_is_never_whole_on_the_driver_and_resumes_from_its_pieces(
        tmp_path, monkeypatch):
    """Evaluated by the partitions, checkpointed as the shards' own files (last.pt says where
    they are), resumed bitwise from them, assembled only by `distbelief.load`. The run that
    is stopped and resumed takes the other way: its shards are told they do not see the run
    directory (as on another machine), so their snapshots go through the driver, both ways."""
    import json

    import distbelief
    from distbelief.data import build_data
    from distbelief.distributed.downpour import trainer as downpour_trainer
    from distbelief.engine import pieces
    from distbelief.engine.checkpoint import PIECES
    from distbelief.engine.evaluate import evaluate

    c = digits_config(iterations=12, milestones=(6,), log_every=4, eval_every=4,
                      checkpoint_every=4, channels_last=False, replicas=1, ps_shards=3,
                      partitions=2, replica_cpus=1)
    straight = DownpourTrainer(c, tmp_path / "straight")
    straight.fit()
    assert straight.piecewise and straight.server._model is None  # never built here
    through_driver = {"written": 0, "read": 0}

    def counted(function, key):
        def call(*args):
            through_driver[key] += 1
            return function(*args)
        return call

    for module in (pieces, downpour_trainer):  # what the driver tells the shards it saw
        monkeypatch.setattr(module, "fingerprint", lambda path: (0, 0))
    monkeypatch.setattr(downpour_trainer, "write_piece",
                        counted(downpour_trainer.write_piece, "written"))
    monkeypatch.setattr(downpour_trainer, "load_snapshot",
                        counted(downpour_trainer.load_snapshot, "read"))
    DownpourTrainer(c.replace(iterations=8), tmp_path / "run").fit()
    resumed = DownpourTrainer(c, tmp_path / "run", resume=True)
    resumed.fit()
    # Every shard's piece of every checkpoint (at 4, 8, 12, and at the end), read once.
    assert through_driver == {"written": 4 * 3, "read": 3}
    assert resumed.server._model is None
    index = load_checkpoint(tmp_path / "run/checkpoints/last.pt", assemble=False)
    assert "model" not in index and len(index[PIECES]["shards"]) == 3
    manifest = json.loads((tmp_path / "run/checkpoints/manifest.json").read_text())
    assert manifest["files"] == ["downpour.pt", "last.pt", "shard-0.pt", "shard-1.pt",
                                 "shard-2.pt"] and manifest["iteration"] == 12
    a, b = distbelief.load(tmp_path / "straight"), distbelief.load(tmp_path / "run")
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name
        assert torch.equal(resumed.trained_model().state_dict()[name], value), name
    # The partitions' evaluation is the assembled model's.
    last = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl")
            if r["kind"] == "eval" and r["split"] == "test"][-1]
    data = build_data(c, torch.device("cpu"))
    mine = evaluate(b, data.splits["test"].batches(), loss=c.loss)
    assert last["iteration"] == 12 and mine["error"] == last["error"]
    assert mine["loss"] == pytest.approx(last["loss"], abs=1e-5)


def two_by_two(run, accuracy: float, **changes):
    """2 replicas of 2 partitions on the digits: each partition holds only its part and pushes
    on its own (its shards see stale pushes), and the model learns."""
    trainer = DownpourTrainer(get_recipe("digits-downpour").replace(partitions=2, **changes),
                              run)
    summary = trainer.fit()
    total = sum(p.numel() for p in trainer.server.model.parameters())
    assert summary["test_accuracy"] >= accuracy, summary
    assert summary["partitions"] == 2 and summary["shard_partitions"] == [0, 1]
    # Each partition pushes on its own, overlapped: its shards see stale pushes.
    assert all(s > 0 for s in summary["partition_staleness_mean"])
    records = read_jsonl(run / "metrics.jsonl")
    cluster = next(r for r in records if r["kind"] == "cluster")
    for replica in cluster["replicas"]:
        params = [p["params"] for p in replica["partitions"]]
        assert params == [p.params for p in trainer.plan.parts]  # each holds its part only
        assert sum(params) == total
    pipe = [r for r in records if r["kind"] == "train"][-1]["partitions"]
    assert 0 < pipe["bubble"] < 1 and pipe["bytes_per_step"][0] > 0
    assert all(s > 0 for s in pipe["compute_s"])


# Two replicas of two partitions, ~35 s even for 200 iterations: make test-all. make test runs
# one partitioned replica through Ray (each partition holding its part only, equal to the
# trainer, above).
@pytest.mark.slow
def test_two_replicas_of_two_partitions_train_apart_and_learn(tmp_path):
    two_by_two(tmp_path / "run", 0.6, iterations=200, milestones=(150,))  # chance: 0.1


# The recipe's 1,200 iterations, a minute and a quarter: make test-all; make test trains the same
# run for 200 (above).
@pytest.mark.slow
def test_two_replicas_of_two_partitions_learn_digits(tmp_path):
    two_by_two(tmp_path / "run", 0.95)  # as two whole replicas do (downpour/test_trainer.py)


# A minute of training around a kill: make test-all. In make test a failed chunk leaves nothing
# on the partitions (downpour/test_partitioned.py) and a partition that dies in single mode ends
# the run in one line (pipeline/test_pipeline_ray.py).
@pytest.mark.slow
def test_a_killed_partition_is_restarted_and_training_completes(tmp_path):
    import ray

    run = tmp_path / "run"
    trainer = DownpourTrainer(get_recipe("digits-downpour").replace(partitions=2), run)

    def kill():
        while trainer.steps < 300:
            time.sleep(0.05)
        ray.kill(trainer.session.stages[1], no_restart=False)  # replica 0, partition 1

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    summary = trainer.fit()
    thread.join()
    assert summary["replica_failures"] == 1 and summary["replica_restarts"] == 1, summary
    assert summary["iterations"] == 1200 and summary["test_accuracy"] >= 0.95, summary
    failures = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "failure"]
    assert failures[0]["actor"] == "replica 0" and "partition" in failures[0]["error"]
