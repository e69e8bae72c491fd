"""Record and replay of real asynchronous Downpour runs on Ray (--record-order; `replay`): the
replay in one process ends with the recorded run's shards bit for bit (CPU, deterministic),
also after a replica was killed and restarted mid-run."""

import pytest
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.downpour.replay import incarnations, replay_run
from distbelief.distributed.downpour.generation import load_snapshot
from distbelief.engine.rundir import RunDir
from distbelief.recipes import get_recipe

from tests.distributed.downpour.test_trainer import kill_when

pytestmark = pytest.mark.usefixtures("ray_cluster", "torch_as_it_was")


def recorded(**kw):
    return get_recipe("digits-downpour").replace(**{
        "iterations": 240, "record_order": True, "deterministic": True, "eval_every": 0,
        "checkpoint_every": 0, "log_every": 60, **kw})


def histories(run):
    return [load_snapshot(RunDir(run), k)["history"] for k in range(2)]


def test_a_two_replica_two_shard_run_replays_bit_for_bit(tmp_path):
    run = tmp_path / "run"
    summary = DownpourTrainer(recorded(), run).fit()
    assert summary["replicas"] == 2 and summary["ps_shards"] == 2
    # Asynchronous for real: some pushes landed on parameters newer than they were computed
    # from, so the order is not a round-robin the replay could guess.
    assert max(summary["staleness"]) >= 1
    replay, report = replay_run(run)
    assert report["equal"] and report["max_abs_diff"] == 0.0, report
    assert report["minibatches"] == 240 and report["incarnations"] == 2
    # Every step of both replicas is in exactly one push's trace.
    steps = sorted((i.replica, s) for i in incarnations(histories(run)).values()
                   for s, _ in i.steps)
    assert steps == sorted(set(steps)) and len(steps) == 240
    # Stopping early gives the state when every shard had 120 minibatches.
    early, report = replay_run(run, until=120)
    assert report["minibatches"] == 120
    assert not torch.equal(early.vector(), replay.vector())


@pytest.mark.slow  # ~40 s; make test-all
def test_a_run_whose_replica_was_killed_and_restarted_replays_bit_for_bit(tmp_path):
    run = tmp_path / "run"
    trainer = DownpourTrainer(recorded(iterations=600), run)
    kill_when(trainer, 40, lambda t: t.session.replicas[1], replica=1)
    summary = trainer.fit()
    assert summary["replica_restarts"] == 1
    found = incarnations(histories(run))
    # The restarted replica is a new process, with steps of its own.
    assert sorted(i.replica for i in found.values()) == [0, 1, 1], \
        [(i.replica, len(i.steps)) for i in found.values()]
    _, report = replay_run(run)
    assert report["equal"] and report["incarnations"] == 3, report
