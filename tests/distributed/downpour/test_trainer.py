"""Downpour SGD on a real local Ray: convergence, faults, resume, metrics."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.downpour.trainer import CHUNK_STEPS
from distbelief.distributed.downpour.replay import replay_run
from distbelief.engine import Diverged, TrainingInterrupted, load_checkpoint
from distbelief.engine.rundir import RunDir, read_jsonl
from distbelief.recipes import get_recipe


pytestmark = pytest.mark.usefixtures("ray_cluster")


def kill_when(trainer, steps, pick, replica=None):
    """Kill the actor pick(trainer) (Ray may restart it) once `steps` steps are done (with
    `replica`: once that replica has done them)."""
    import ray

    def done():
        return trainer.steps if replica is None else trainer.progress.positions[replica]

    def run():
        while done() < steps:
            time.sleep(0.05)
        ray.kill(pick(trainer), no_restart=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # ~1 min; make test-all
def test_two_replicas_two_shards_learn_digits(tmp_path):
    run = tmp_path / "run"
    summary = DownpourTrainer(get_recipe("digits-downpour"), run).fit()
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["iterations"] == 1200 and summary["replicas"] == 2
    assert all(x > 0 for x in summary["replica_images_per_s"])
    assert sum(summary["staleness"].values()) == sum(summary["shard_updates"])
    assert summary["replica_failures"] == summary["shard_failures"] == 0
    # Overlapped replicas are asynchronous: pushes land on parameters newer than they were
    # computed from.
    assert summary["staleness_mean"] > 0 and max(summary["staleness"]) >= 1
    records = read_jsonl(run / "metrics.jsonl")
    cluster = [r for r in records if r["kind"] == "cluster"][0]
    assert len(cluster["replicas"]) == 2 and len(cluster["shards"]) == 2
    train = [r for r in records if r["kind"] == "train"]
    assert all("updates_per_s" in s and "bytes_per_s" in s for s in train[-1]["shards"])
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(r["wall_s"] > 0 and r["examples"] == r["iteration"] * 64 for r in evals)
    assert json.loads((run / "summary.json").read_text())["mode"] == "downpour"


@pytest.mark.slow  # ~1 min; make test-all
def test_a_killed_replica_is_restarted_and_training_completes(tmp_path):
    run = tmp_path / "run"
    trainer = DownpourTrainer(get_recipe("digits-downpour"), run)
    kill_when(trainer, 300, lambda t: t.session.replicas[1])
    summary = trainer.fit()
    # One death is one failure (calls to the restarting actor are not counted again).
    assert summary["replica_failures"] == 1 and summary["replica_restarts"] == 1
    assert summary["iterations"] == 1200 and summary["test_accuracy"] >= 0.95, summary
    failures = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "failure"]
    assert failures[0]["actor"] == "replica 1" and failures[0]["restarted"]


def test_a_replica_that_is_gone_for_good_leaves_the_look_ahead(tmp_path):
    """--max-restarts 0: replica 1 dies and is not restarted; replica 0 finishes the run and
    the shards' dana look-ahead holds replica 0's momentum alone. Under --ssp-bound 0 replica 0
    would wait for the dead one for ever if it did not leave the clocks (a stop after 60 s
    turns that hang into a failure here)."""
    config = get_recipe("digits-downpour").replace(iterations=240, max_restarts=0,
                                                   eval_every=0, checkpoint_every=0,
                                                   ssp_bound=0)
    trainer = DownpourTrainer(config, tmp_path / "run")
    # Once replica 1 has trained (it has joined the clocks: replicas start at different times).
    kill_when(trainer, 30, lambda t: t.session.replicas[1], replica=1)
    watchdog = threading.Timer(60.0, trainer.request_stop)
    watchdog.start()
    try:
        summary = trainer.fit()
    finally:
        watchdog.cancel()
    assert summary["replica_failures"] == 1 and summary["replica_restarts"] == 0
    assert summary["iterations"] == 240 and summary["lookahead_sources"] == [0]


def test_a_straggler_holds_the_others_within_the_ssp_bound(tmp_path):
    """Replica 0 sleeps 60 ms after each step, replica 1 takes a few ms. Under --ssp-bound 2
    replica 1 waits for it, so the two train about as many steps: they part only once all the
    work is handed out and the clocks are released (each then holds at most its two queued
    chunks). Without the bound replica 1 would train several times replica 0's steps."""
    run = tmp_path / "run"
    config = get_recipe("digits-downpour").replace(iterations=160, milestones=(),
                                                   eval_every=0, checkpoint_every=0,
                                                   ssp_bound=2, straggler_delay=0.06)
    summary = DownpourTrainer(config, run).fit()
    positions = load_checkpoint(RunDir(run).state_file("downpour"))["positions"]
    assert sum(positions) == 160 and summary["iterations"] == 160
    assert abs(positions[0] - positions[1]) <= 2 + 1 + 2 * CHUNK_STEPS, positions
    assert summary["replica_time_s"]["bound_wait_s"] > 1.0, summary["replica_time_s"]


@pytest.mark.slow  # ~1 min; make test-all
def test_a_killed_shard_restarts_from_its_snapshot(tmp_path):
    run = tmp_path / "run"
    config = get_recipe("digits-downpour").replace(snapshot_every_s=0.5)
    trainer = DownpourTrainer(config, run)
    kill_when(trainer, 400, lambda t: t.session.shards[0])
    summary = trainer.fit()
    assert summary["shard_failures"] == 1
    assert summary["iterations"] == 1200 and summary["test_accuracy"] >= 0.95, summary
    failure = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "failure"][0]
    assert failure["actor"] == "shard 0" and failure["restored_version"] > 0
    # Every push reached both shards; shard 0 lost at most the window since its last snapshot
    # (the driver's count of it is a lower bound), and applied no push twice.
    behind = summary["shard_updates"][1] - summary["shard_updates"][0]
    assert 0 <= summary["shard_updates_lost"] <= behind < summary["shard_updates"][1] / 10
    assert summary["shard_updates_lost"] == failure["updates_lost"]


def test_stop_then_resume_completes_the_run(tmp_path):
    run = tmp_path / "run"
    config = get_recipe("digits-downpour").replace(iterations=300, milestones=(200,),
                                                   eval_every=100, checkpoint_every=100)
    trainer = DownpourTrainer(config, run)

    def stop():
        while trainer.steps < 120:
            time.sleep(0.05)
        trainer.request_stop()

    threading.Thread(target=stop, daemon=True).start()
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    stopped_at = load_checkpoint(RunDir(run).state_file("downpour"))["steps"]
    assert 120 <= stopped_at < 300
    assert all(RunDir(run).state_file(f"shard-{k}").is_file() for k in range(2))
    summary = DownpourTrainer(config, run, resume=True).fit()
    assert summary["iterations"] == 300
    records = read_jsonl(run / "metrics.jsonl")
    assert {"kind": "resume", "iteration": stopped_at} in records
    assert max(r["iteration"] for r in records if r["kind"] == "train") == 300


@pytest.mark.slow  # ~20 s; make test-all (the arithmetic is tested in process: test_local_steps)
def test_local_steps_through_ray_push_once_per_round_and_learn(tmp_path):
    # Two Ray replicas, four local steps per push: every shard applies a push per round of
    # each replica (the minibatches still count one by one for the schedule), and the
    # changes they push train the model.
    config = get_recipe("digits-downpour").replace(iterations=160, milestones=(), eval_every=0,
                                                   checkpoint_every=0, local_steps=4)
    summary = DownpourTrainer(config, tmp_path / "run").fit()
    assert summary["local_steps"] == 4 and summary["iterations"] == 160
    assert summary["shard_updates"] == [40, 40]
    assert summary["test_accuracy"] > 0.8, summary["test_accuracy"]


# Ray passes a KeyboardInterrupt on as it is: SIGINT's case (make test-all) guards that.
@pytest.mark.parametrize("signum, aborts", [
    (signal.SIGTERM, SystemExit),
    pytest.param(signal.SIGINT, KeyboardInterrupt, marks=pytest.mark.slow)])
def test_a_second_signal_inside_rays_wait_stops_at_once_as_that_signal(tmp_path, signum,
                                                                        aborts):
    """Ray turns an exception a signal handler raises inside ray.wait into SystemExit(1): a
    second SIGTERM used to end the command with status 1 and no line."""
    config = get_recipe("digits-downpour").replace(iterations=3000, checkpoint_every=0,
                                                   eval_every=0)
    trainer = DownpourTrainer(config, tmp_path / "run")

    def twice():
        while trainer.steps < 20:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)
        while trainer.life.stop_signal is None:  # the first one handled (in ray.wait) ...
            time.sleep(0.001)
        os.kill(os.getpid(), signum)  # ... and the second while the replicas finish

    threading.Thread(target=twice, daemon=True).start()
    with pytest.raises(aborts) as raised:
        trainer.fit()
    if aborts is SystemExit:
        assert raised.value.code == 128 + signum
    assert trainer.steps < 3000 and not RunDir(tmp_path / "run").checkpoint.exists()


# make test-all. In make test a diverged chunk raises without Ray (downpour/test_records.py) and
# the single-process trainer keeps its last good checkpoint (engine/test_trainer.py).
@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    # 40 sane warmup steps (two checkpoints), then an lr that overflows at once (at 1e6 the
    # loss may stay finite, ~1e29, behind BatchNorm when the replicas' staleness is low).
    config = get_recipe("digits-downpour").replace(
        iterations=200, lr=1e30, warmup_iterations=40, warmup_lr=0.05, milestones=(190,),
        checkpoint_every=20, eval_every=0, record_order=True)
    with pytest.raises(Diverged, match="lower --lr"):
        DownpourTrainer(config, run).fit()
    checkpoint = load_checkpoint(run / "checkpoints/last.pt")
    assert checkpoint["iteration"] >= 20
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())
    # --record-order: the shard actors' histories were kept at the divergence, and replay
    # past the last checkpoint (whose own history ends there), to where the server broke or,
    # where the replicas' losses broke first (their pushes are dropped), to the last push.
    _, report = replay_run(run)
    assert report["source"] == "diverged"
    assert report["minibatches"] > checkpoint["iteration"] - 8  # pushes in flight at most
    assert report["diverged_at"] is None or report["diverged_at"] <= \
        report["recorded_minibatches"]


# make test-all; in make test the warmstart's decisions run without Ray
# (downpour/test_work.py), Adagrad through Ray in parity/test_downpour.py and evaluations on
# the clock in engine/test_lifecycle.py.
@pytest.mark.slow
def test_warmstart_trains_one_replica_first_and_evaluates_on_the_clock(tmp_path):
    run = tmp_path / "run"
    config = get_recipe("digits-downpour").replace(
        iterations=160, warmstart_steps=60, milestones=(150,), eval_every=0,
        eval_interval_s=0.5, optimizer="adagrad", lr=0.05)
    summary = DownpourTrainer(config, run).fit()
    records = read_jsonl(run / "metrics.jsonl")
    release = [r for r in records if r["kind"] == "release"]
    assert release == [{"kind": "release", "iteration": 60, "positions": [60, 0]}]
    assert summary["iterations"] == 160 and summary["optimizer"] == "adagrad"
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) >= 2 and evals[0]["iteration"] < 160  # by wall clock, mid-run
    assert summary["replica_time_s"]["compute_s"] > 0


# make test-all; in make test the sizing runs without Ray (test_placement.py).
@pytest.mark.slow
def test_more_replicas_than_cpus_share_them(tmp_path):
    config = get_recipe("digits-downpour").replace(replicas=3, iterations=60, milestones=(50,),
                                                   eval_every=0)
    summary = DownpourTrainer(config).fit()
    assert summary["iterations"] == 60 and len(summary["replica_images_per_s"]) == 3
    assert all(x > 0 for x in summary["replica_images_per_s"])
