"""The run folder against what other processes, disks and damaged files do to it: one writer at
a time, files that follow the umask, stale temporary files removed, and every damaged file read
as one clear error instead of a traceback."""

import json
import os
import socket

import pytest
import torch

from distbelief.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from distbelief.engine.lifecycle import RunLifecycle, saved_state
from distbelief.engine.rundir import RunDir, RunLock, read_jsonl
from distbelief.errors import CheckpointError, ConfigError, StorageError
from distbelief.recipes import get_recipe
from support.runs import at


def started_run(folder, config=None):
    """A new run folder as `begin` writes it, with its lifecycle (holding the lock)."""
    config = config or get_recipe("digits")
    life = RunLifecycle(folder, mode="single", state="last")
    life.open(config, resume=False)
    life.begin(at(config, 0))
    return life, config


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    life, config = started_run(tmp_path / "run")
    other = RunLifecycle(tmp_path / "run", mode="single", state="last")
    held = f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(StorageError, match=f"run is in use by another distbelief run "
                                           f"\\({held}\\); wait for it to end"):
        other.open(config, resume=True)
    life.release()  # the first writer ends: the kernel's lock goes with it
    assert other.open(config, resume=True) is None  # stopped before its first checkpoint
    other.release()


def test_the_lock_is_taken_before_a_resume_reads_anything(tmp_path):
    life, config = started_run(tmp_path / "run")
    save_checkpoint(life.run.checkpoint, {"config": config.to_dict(), "mode": "single",
                                          "wall_s": 1.0})
    life.release()
    holder = RunLock(tmp_path / "run" / ".lock")
    # saved_state alone reads; the lifecycle's open refuses before it would.
    assert saved_state(life.run, "single", "last", config, ())["wall_s"] == 1.0
    with pytest.raises(StorageError, match="in use"):
        RunLifecycle(tmp_path / "run", mode="single", state="last").open(config, resume=True)
    holder.release()


def test_a_killed_writers_temporary_files_go_at_the_next_start(tmp_path):
    life, config = started_run(tmp_path / "run")
    life.release()
    run = life.run
    (run.checkpoints / "gen-000001").mkdir(parents=True)
    stale = [run.path / ".metrics.jsonl.abc123.tmp", run.checkpoints / ".last.pt.x9.tmp",
             run.checkpoints / "gen-000001" / ".shard-0.pt.q.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    kept = run.path / "notes.tmp"  # not ours: no leading dot
    kept.write_text("mine")
    again = RunLifecycle(run.path, mode="single", state="last")
    again.open(config, resume=True)
    assert not any(p.exists() for p in stale) and kept.read_text() == "mine"
    again.release()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        life, config = started_run(tmp_path / "run")
        life.run.write_summary({"ok": 1})
        save_checkpoint(life.run.checkpoint, {"x": torch.zeros(2)})
        life.release()
    finally:
        os.umask(before)
    for path in (life.run.config_file, life.run.summary_file, life.run.checkpoint):
        assert path.stat().st_mode & 0o777 == mode, path


@pytest.mark.parametrize("content, says", [
    (b"[1, 2]", "is not a checkpoint manifest"), (b"", "is not a checkpoint manifest"),
    (b"\xff\xfe{", "is not a checkpoint manifest"),
    (b'{"folder": "gen-000009"}', "names no checkpoint folder here"),
    (b'{"folder": 7}', "names no checkpoint folder here")])
def test_a_damaged_manifest_is_named_not_taken_for_a_missing_state(tmp_path, content, says):
    run = RunDir(tmp_path)
    run.write_generation({"downpour": {"steps": 1}}, 1)
    run.manifest.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"manifest.json {says}"):
        run.state_file("downpour")
    # The complete generation is still there for a person to recover.
    assert load_checkpoint(run.checkpoints / "gen-000001" / "downpour.pt")["steps"] == 1


def test_a_new_generation_never_reuses_a_torn_folders_number(tmp_path):
    run = RunDir(tmp_path)
    run.write_generation({"a": {"v": 1}}, 1)
    (run.checkpoints / "gen-000007").mkdir()  # torn: a crash before its manifest
    run.manifest.write_text("damaged")
    folder = run.write_generation({"a": {"v": 2}}, 2)
    assert folder.name == "gen-000008" and load_checkpoint(run.state_file("a"))["v"] == 2
    assert sorted(p.name for p in run.checkpoints.glob("gen-*")) == ["gen-000008"]


@pytest.mark.parametrize("content", [
    b"\xff\xfe not utf-8", b"- a\n- b\n", b"just text", b"config: [1, 2]\n",
    b"config: {iterations: many}\n", b"config: {nonsense_field: 1}\n", b"{{{", b""])
def test_a_damaged_config_yaml_is_one_config_error(tmp_path, content):
    run = RunDir(tmp_path)
    run.config_file.write_bytes(content)
    with pytest.raises(ConfigError, match=r"config\.yaml is malformed"):
        run.read_config()


def test_metrics_lines_that_are_not_records_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "iteration": 1}\n\xff\xfe\n[1, 2]\n"text"\n'
                     b'{"kind": "train", "iteration": "two"}\n{"kind": "train", "iter')
    records = read_jsonl(path)
    assert records == [{"kind": "train", "iteration": 1}, {"kind": "train", "iteration": "two"}]
    run = RunDir(tmp_path)
    run.truncate_metrics(1)  # an iteration that is not a number counts as 0: kept
    assert [r["iteration"] for r in read_jsonl(path)] == [1, "two"]


def test_a_damaged_summary_is_one_config_error(tmp_path):
    run = RunDir(tmp_path)
    for content in (b"", b"[1]", b"\xff"):
        run.summary_file.write_bytes(content)
        with pytest.raises(ConfigError, match="summary.json is missing or damaged"):
            run.read_summary()


def test_an_out_below_a_regular_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    life = RunLifecycle(tmp_path / "file" / "run", mode="single", state="last")
    with pytest.raises(StorageError, match=f"cannot create .*file/run: {tmp_path}/file is "
                                           f"not a folder"):
        life.open(get_recipe("digits"), resume=False)
    assert (tmp_path / "file").read_text() == "x"


def test_a_write_that_fails_names_the_path_and_keeps_the_previous_file(tmp_path):
    life, config = started_run(tmp_path / "run")
    life.run.write_summary({"before": 1})
    target = life.run.path / "sub"
    target.write_text("a file where a folder should be")
    with pytest.raises(StorageError, match=r"cannot write .*sub/x\.json: .*sub is not a folder"):
        atomic_write_text(target / "x.json", "{}")
    (life.run.path / "record.json").mkdir()  # a folder where the file goes
    with pytest.raises(StorageError, match=r"cannot write .*run/record\.json: Is a directory"):
        atomic_write_text(life.run.path / "record.json", "{}")
    assert json.loads(life.run.summary_file.read_text()) == {"before": 1}
    assert sorted(p.name for p in life.run.path.iterdir()) == [
        ".lock", "config.yaml", "metrics.jsonl", "record.json", "sub", "summary.json"]
    life.release()


def test_plot_leaves_out_records_without_numbers(tmp_path):
    from distbelief.plot import plot_runs, run_curves

    life, _ = started_run(tmp_path / "run")
    for record in ({"kind": "train", "iteration": 5, "error": 0.5},
                   {"kind": "train", "iteration": "ten", "error": 0.4},  # damaged
                   {"kind": "train", "iteration": 15, "error": None},  # sandblaster-like
                   {"kind": "train", "iteration": 20, "error": 0.3},
                   {"kind": "eval", "split": "test", "iteration": 20, "error": "x"},  # damaged
                   {"kind": "eval", "split": "test", "iteration": 20, "error": 0.35}):
        life.log(record)
    life.release()
    curves = run_curves(tmp_path / "run")
    assert curves["train"] == ((5, 20), (0.5, 0.3)) and curves["test"] == ((20,), (0.35,))
    assert plot_runs([tmp_path / "run"], tmp_path / "curves.png").stat().st_size > 0
