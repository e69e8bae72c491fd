"""--tensorboard: event files with the records' scalars, readable by tensorboard's own reader,
and no step shown twice after a resume."""

import shutil

import pytest

from distbelief.engine import Trainer
from distbelief.engine.rundir import read_jsonl
from distbelief.engine.tensorboard import scalars
from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe

FAST = dict(batch_size=16, eval_every=10, log_every=5, checkpoint_every=10, tensorboard=True)


def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_records_become_tagged_scalars():
    train = {"kind": "train", "iteration": 40, "examples": 640, "wall_s": 3.0, "loss": 0.5,
             "error": 0.25, "lr": 0.1, "converged": None, "rejected": 0,
             "replica_images_per_s": [100.0, 90.5],
             "shards": [{"shard": 0, "version": 40, "updates_per_s": 12.5},
                        {"shard": 1, "version": 39, "updates_per_s": 12.0}]}
    assert sorted(scalars(train)) == sorted([
        ("train/loss", 0.5), ("train/error", 0.25), ("train/lr", 0.1), ("train/rejected", 0.0),
        ("train/replica_images_per_s/0", 100.0), ("train/replica_images_per_s/1", 90.5),
        ("shard/0/version", 40.0), ("shard/0/updates_per_s", 12.5),
        ("shard/1/version", 39.0), ("shard/1/updates_per_s", 12.0)])
    test = {"kind": "eval", "split": "test", "iteration": 40, "loss": 1.5, "error": 0.5,
            "top5_error": 0.1, "images": 360}
    assert scalars(test) == [("test/loss", 1.5), ("test/error", 0.5), ("test/top5_error", 0.1)]
    assert scalars({**test, "split": "train"})[0] == ("train/eval_loss", 1.5)
    assert scalars({"kind": "failure", "iteration": 3, "restarted": True}) == []
    pipeline = {"kind": "train", "iteration": 8, "pipeline": {
        "partitions": 2, "bubble": 0.25, "compute_s": [1.5, 2.0], "bytes_per_step": [64, 0]}}
    assert sorted(scalars(pipeline)) == sorted([
        ("partition/partitions", 2.0), ("partition/bubble", 0.25),
        ("partition/0/compute_s", 1.5), ("partition/1/compute_s", 2.0),
        ("partition/0/bytes_per_step", 64.0), ("partition/1/bytes_per_step", 0.0)])


def test_a_run_writes_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    Trainer(get_recipe("digits").replace(iterations=20, **FAST), run).fit()
    seen = events(run)
    records = read_jsonl(run / "metrics.jsonl")
    train = [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in seen["train/loss"]] == [s for s, _ in train] == [5, 10, 15, 20]
    assert [v for _, v in seen["train/loss"]] == pytest.approx([v for _, v in train])
    tests = [(r["iteration"], r["error"]) for r in records
             if r["kind"] == "eval" and r["split"] == "test"]
    assert [s for s, _ in seen["test/error"]] == [s for s, _ in tests] == [10, 20]
    assert [v for _, v in seen["test/error"]] == pytest.approx([v for _, v in tests])
    assert {"train/lr", "train/images_per_s", "test/top5_error"} <= set(seen)


def test_a_resume_after_a_kill_shows_every_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    config = get_recipe("digits").replace(**FAST)
    Trainer(config.replace(iterations=10), run).fit()
    checkpoint_at_10 = tmp_path / "last-10.pt"
    shutil.copy(run / "checkpoints" / "last.pt", checkpoint_at_10)
    Trainer(config.replace(iterations=20), run, resume=True).fit()
    # Killed outright after iteration 20's records but before its checkpoint: the last
    # checkpoint on disk is the one of iteration 10.
    shutil.copy(checkpoint_at_10, run / "checkpoints" / "last.pt")
    Trainer(config.replace(iterations=20), run, resume=True).fit()
    assert [s for s, _ in events(run)["train/loss"]] == [5, 10, 15, 20]


def test_without_a_run_directory_it_is_one_config_error():
    with pytest.raises(ConfigError, match="--tensorboard needs a run directory"):
        Trainer(get_recipe("digits").replace(iterations=2, tensorboard=True))
