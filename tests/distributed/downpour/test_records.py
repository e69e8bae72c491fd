"""What the Downpour driver records from its shards' statuses and replicas' chunks (no Ray)."""

from collections import Counter

import pytest

from distbelief.distributed.downpour.records import (ChunkWindow, ReplicaProgress, ShardMonitor,
                                                     mean_staleness, staleness, summary_entries)
from distbelief.distributed.downpour.work import WorkQueue
from distbelief.engine.failures import FailureBook
from distbelief.engine.lifecycle import Diverged, RunLifecycle


def status(shard, version, incarnation="a", restored=None, **kw):
    return {"shard": shard, "version": version, "incarnation": incarnation, "rejected": 0,
            "restored_version": restored, "bytes_in": 100 * version, "bytes_out": 10 * version,
            "staleness": {0: version}, "lr": 0.1, "momentum": 0.4, "lookahead_sources": [0],
            **kw}


def test_a_new_incarnation_is_a_restart_that_lost_the_updates_since_its_snapshot():
    life = RunLifecycle(None, mode="downpour", state="downpour")
    monitor = ShardMonitor(FailureBook(life, replicas=1, max_restarts=3))
    monitor.observe([status(0, 40), status(1, 40)], position=80)
    monitor.observe([status(0, 45), status(1, 32, incarnation="b", restored=30)], position=90)
    assert life.counters["shard_failures"] == 1 and life.counters["shard_updates_lost"] == 10
    monitor.observe([status(0, 50), status(1, 35, incarnation="b", restored=30)], position=95)
    assert life.counters["shard_failures"] == 1  # the same incarnation: no new failure


def test_rates_are_per_second_between_polls_of_the_same_incarnation():
    monitor = ShardMonitor(book=None)
    first = monitor.rates([status(0, 10)], now=100.0)
    assert "updates_per_s" not in first[0]
    rows = monitor.rates([status(0, 30), status(1, 5)], now=102.0)
    assert rows[0]["updates_per_s"] == 10.0 and rows[0]["bytes_per_s"] == 20 * 110 / 2
    assert "updates_per_s" not in rows[1]  # a shard not seen before
    rows = monitor.rates([status(0, 31, incarnation="new")], now=103.0)
    assert "updates_per_s" not in rows[0]  # restarted: its counters began again


def test_staleness_adds_up_over_shards_and_the_summary_splits_the_replicas_time():
    statuses = [status(0, 4, staleness={0: 1, 2: 3}),
                status(1, 4, staleness={"2": 4}, lookahead_sources=[0, 2])]
    assert staleness(statuses) == Counter({0: 1, 2: 7}) and mean_staleness(Counter()) == 0.0
    assert mean_staleness(staleness(statuses)) == round(14 / 8, 3)
    summary = summary_entries(statuses, Counter(replica_failures=1), [640, 320], [2.0, 4.0],
                              Counter(compute_s=4.0, fetch_wait_s=0.5, push_wait_s=0.25,
                                      bound_wait_s=0.25), 2.0)
    assert summary["replica_images_per_s"] == [320.0, 80.0]
    assert summary["replica_time_s"] == {"compute_s": 4.0, "fetch_wait_s": 0.5,
                                         "push_wait_s": 0.25, "bound_wait_s": 0.25,
                                         "other_s": 1.0}
    assert summary["replica_failures"] == 1 and summary["shard_updates"] == [4, 4]
    assert summary["shard_updates_per_s"] == [2.0, 2.0]
    assert summary["lookahead_sources"] == [0, 2]  # over all shards


def test_the_window_averages_over_images_and_keeps_each_replica_s_rate():
    window = ChunkWindow(2)
    window.add(0, {"replica": 0, "start": 0, "images": 64, "seconds": 0.5, "loss_sum": 128.0,
                   "wrong": 16, "compute_s": 0.4, "fetch_wait_s": 0.0, "push_wait_s": 0.1,
                   "rejected": 0})
    record = window.record([status(0, 1)], shards=[])
    assert record["loss"] == 2.0 and record["error"] == 0.25
    assert record["replica_images_per_s"] == [128.0, 0.0] and record["push_wait_s"] == 0.1


def chunk(replica, images, seconds, **kw):
    return {"replica": replica, "images": images, "seconds": seconds, "compute_s": seconds,
            "fetch_wait_s": 0.25, "push_wait_s": 0.0, "bound_wait_s": 0.125, "loss_sum": 1.0,
            **kw}


def test_replica_progress_counts_finished_chunks_and_restores_from_its_state():
    work = WorkQueue([0, 0], total=40, chunk=10, depth=1)
    progress = ReplicaProgress(2)
    first, second = work.take()
    progress.finished(work, second, chunk(1, 640, 2.0))
    progress.finished(work, first, chunk(0, 640, 4.0))
    assert (progress.positions, progress.steps) == ([10, 10], 20)
    assert progress.replica_images == [640, 640] and progress.replica_seconds == [4.0, 2.0]
    assert progress.time_split == Counter(compute_s=6.0, fetch_wait_s=0.5, push_wait_s=0.0,
                                          bound_wait_s=0.25)
    again = ReplicaProgress(2, saved={**progress.state(), "data_stats": None})
    assert again.state() == progress.state()


def test_a_chunk_whose_loss_diverged_raises_and_counts_nothing():
    work = WorkQueue([0], total=20, chunk=10, depth=1)
    progress = ReplicaProgress(1)
    (only,) = work.take()
    with pytest.raises(Diverged, match="replica 0 after 0 steps; lower --lr"):
        progress.finished(work, only, chunk(0, 640, 1.0, diverged=True, loss_sum=float("nan")))
    assert progress.steps == 0 and progress.replica_images == [0]
