"""Sandblaster L-BFGS on a real local Ray: backup tasks, replica failures and resume neither
lose nor double-count a portion (the iterates stay the local core's); a lost shard is one line."""

import threading
import time

import numpy as np
import pytest
import torch

from distbelief.distributed import SandblasterTrainer
from distbelief.engine import load_checkpoint
from distbelief.engine.rundir import RunDir, read_jsonl
from support.sandblaster import (ITERATIONS, assert_same_iterates, config, distributed_run,
                                 local_losses)


pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def reference():
    return local_losses(config())


def test_backup_tasks_beat_a_straggler_and_late_duplicates_count_once(tmp_path, reference):
    # Replica 0 takes 50 ms per portion, replica 1 well under 1 ms: each portion the straggler
    # starts is backed up, and its copy arrives rounds later, after the winner.
    c = config(replicas=2, ps_shards=2, portions=8, straggler_delay=0.05)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert_same_iterates(records, x, reference)
    assert summary["backup_tasks"] > 0
    assert summary["backup_wasted"] > 0
    # The fast replica does most portions (load balancing), the straggler a few.
    fast, slow = summary["portions_per_replica"][1], summary["portions_per_replica"][0]
    assert fast > 2 * slow

    c = c.replace(backup_tasks=False)
    summary, records, x = distributed_run(c.replace(iterations=3), tmp_path / "no-backups")
    assert summary["backup_tasks"] == 0 and summary["backup_wasted"] == 0
    np.testing.assert_allclose([r["loss"] for r in records], reference[0][:4], rtol=1e-5)


# A replica or shard killed mid-round: make test-all. In make test the portion queue's
# failure paths run without Ray (sandblaster/test_portions.py), and a shard gone for good and a
# straggler with backup tasks run on Ray below.
@pytest.mark.slow
def test_killing_a_replica_while_it_computes_loses_and_double_counts_nothing(tmp_path,
                                                                            reference):
    import ray

    c = config(replicas=2, ps_shards=2, portions=16, push_every=4, straggler_delay=0.02)

    def kill(trainer):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.round < 4:
            time.sleep(0.01)
        time.sleep(0.05)  # inside a round: portions are in flight and in accumulators
        ray.kill(trainer.session.replicas[1], no_restart=False)

    summary, records, x = distributed_run(c, tmp_path / "run", during=kill)
    assert summary["replica_failures"] == 1 and summary["replica_restarts"] == 1
    assert_same_iterates(records, x, reference)
    failures = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "failure"]
    assert [f["actor"] for f in failures] == ["replica 1"]


# A replica or shard killed mid-round: make test-all. In make test the portion queue's
# failure paths run without Ray (sandblaster/test_portions.py), and a shard gone for good and a
# straggler with backup tasks run on Ray below.
@pytest.mark.slow
def test_portions_a_dead_replica_won_but_never_pushed_are_computed_again(tmp_path, reference,
                                                                         monkeypatch):
    """Replica 1 holds every portion it won until the end of the round (push_every is larger
    than the batch) and dies just before pushing them in round 4: they are missing on the
    shards, found, and computed again, once each."""
    import ray

    from distbelief.distributed.sandblaster.gradient import BatchGradient

    original = BatchGradient._collect
    killed = []

    def collect(self, round_):
        if round_ == 4 and not killed:  # once: round 4 is collected again after the repair
            killed.append(round_)
            replica = self.replicas[1]
            pid = ray.get(replica.info.remote())["pid"]
            ray.kill(replica, no_restart=False)
            while True:  # the kill is asynchronous: wait until that process is gone
                try:
                    if ray.get(replica.info.remote(), timeout=60)["pid"] != pid:
                        break
                except ray.exceptions.RayActorError:
                    break
                time.sleep(0.01)
        return original(self, round_)

    monkeypatch.setattr(BatchGradient, "_collect", collect)
    c = config(replicas=2, ps_shards=2, portions=16, push_every=100, backup_tasks=False)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert summary["replica_failures"] == 1
    assert summary["portions_recomputed"] > 0
    assert_same_iterates(records, x, reference)


# A replica or shard killed mid-round: make test-all. In make test the portion queue's
# failure paths run without Ray (sandblaster/test_portions.py), and a shard gone for good and a
# straggler with backup tasks run on Ray below.
@pytest.mark.slow
def test_a_lost_shard_is_rebuilt_and_its_iteration_repeated(tmp_path, reference, monkeypatch):
    """Shard 1 is killed in round 4, inside an iteration (its line search): Ray restarts it
    from the keeper's vectors of that iteration's start, the other shard goes back to them too,
    the iteration is repeated, and the iterates are the uninterrupted run's."""
    import ray

    from distbelief.distributed.sandblaster.gradient import BatchGradient

    original = BatchGradient._collect
    killed = []

    def collect(self, round_):
        if round_ == 4 and not killed:  # before the replicas push the round's gradients
            killed.append(round_)
            ray.kill(self.store.store.shards[1], no_restart=False)
        return original(self, round_)

    monkeypatch.setattr(BatchGradient, "_collect", collect)
    summary, records, x = distributed_run(config(replicas=2, ps_shards=2, portions=8),
                                          tmp_path / "run")
    assert killed and summary["shard_failures"] == 1 and summary["iterations_repeated"] == 1
    assert_same_iterates(records, x, reference)
    failures = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "failure"]
    assert [f["actor"] for f in failures] == ["shard"] and failures[0]["repeated"]


def test_a_shard_gone_for_good_stops_the_run_in_one_line_and_keeps_the_checkpoint(tmp_path):
    import ray

    from distbelief.errors import DistbeliefError

    c = config(replicas=1, ps_shards=2, iterations=1000, checkpoint_every=2,
               batch_size=256, straggler_delay=0.01)  # new batches: it never converges

    def kill(trainer):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.iteration < 3:
            time.sleep(0.01)
        ray.kill(trainer.session.shards[1], no_restart=True)

    trainer = SandblasterTrainer(c, tmp_path / "run")
    threading.Thread(target=kill, args=(trainer,), daemon=True).start()
    with pytest.raises(DistbeliefError, match="parameter-server shard is gone"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert saved["iteration"] >= 2 and saved["mode"] == "sandblaster"


def test_resume_retraces_the_uninterrupted_run(tmp_path, reference):
    c = config(replicas=2, ps_shards=2)
    SandblasterTrainer(c.replace(iterations=5), tmp_path / "run").fit()
    assert RunDir(tmp_path / "run").state_file("vectors-1").is_file()
    summary = SandblasterTrainer(c, tmp_path / "run", resume=True).fit()
    assert summary["iterations"] == ITERATIONS
    records = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"]
    x = torch.cat([v.reshape(-1) for v in
                   load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"].values()])
    assert_same_iterates(records, x, reference)


# Three runs, ~30 s: make test-all; make test resumes with every snapshot (above).
@pytest.mark.slow
def test_a_resume_without_a_shards_snapshot_goes_on_from_the_last_parameters(tmp_path,
                                                                           reference):
    c = config(replicas=2, ps_shards=2)
    SandblasterTrainer(c.replace(iterations=5), tmp_path / "run").fit()
    RunDir(tmp_path / "run").state_file("vectors-1").unlink()
    summary = SandblasterTrainer(c.replace(iterations=ITERATIONS + 2), tmp_path / "run",
                                 resume=True).fit()
    # From last.pt's parameters with a fresh history: not the reference's iterates, but on.
    assert summary["iterations"] == ITERATIONS + 2
    assert summary["train_loss"] <= reference[0][5]
