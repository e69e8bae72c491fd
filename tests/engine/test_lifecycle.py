"""The run lifecycle every mode shares: cadence, the failure book, opening and resuming run
directories, signals, and fit's guarantees (close always runs; the final evaluation)."""

import os
import signal

import pytest
import torch

from distbelief.engine.checkpoint import save_checkpoint
from distbelief.engine.lifecycle import Cadence, FailureBook, RunLifecycle
from distbelief.engine.rundir import read_jsonl
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError
from distbelief.recipes import get_recipe


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_cadence_every_n_iterations_and_every_s_seconds():
    every = Cadence(10, position=25)
    assert [p for p in range(25, 61) if every.due(p) and not every.done(p)] == [30, 40, 50, 60]
    assert not any(Cadence(0, 0).due(p) for p in range(1000))
    clock = Clock()
    timed = Cadence(0, 0, interval_s=2.0, clock=clock)
    clock.now = 1.9
    assert not timed.due(1)
    clock.now = 2.0
    assert timed.due(1)
    timed.done(1)
    assert not timed.due(2)


def test_failure_book_counts_each_death_once_and_gives_up_after_max_restarts(tmp_path):
    life = RunLifecycle(tmp_path / "run", mode="downpour", state="downpour")
    life.open(get_recipe("digits-downpour"), resume=False)
    life.begin(get_recipe("digits-downpour"), "cpu", 0)
    book = FailureBook(life, replicas=2, max_restarts=1)
    assert book.replica_failed(1, RuntimeError("killed"), position=10) is True
    assert book.replica_failed(1, RuntimeError("again"), position=20) is False
    assert book.alive == {0}
    assert book.replica_failed(0, RuntimeError("first"), position=25) is True
    with pytest.raises(DistbeliefError, match="every replica failed more than --max-restarts 1"):
        book.replica_failed(0, RuntimeError("last"), position=30)
    counts = {k: life.counters[k] for k in ("replica_failures", "replica_restarts")}
    assert counts == {"replica_failures": 4, "replica_restarts": 2}
    book.shard_restarted(0, position=40, restored_version=7, lost=3)
    records = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "failure"]
    assert [(r["actor"], r["iteration"], r.get("restarted")) for r in records] == [
        ("replica 1", 10, True), ("replica 1", 20, False), ("replica 0", 25, True),
        ("replica 0", 30, False),
        ("shard 0", 40, None)]
    assert records[-1]["updates_lost"] == 3 and life.counters["shard_updates_lost"] == 3


def _saved_run(tmp_path, mode="downpour", state="downpour"):
    config = get_recipe("digits-downpour").replace(mode=mode)
    life = RunLifecycle(tmp_path, mode=mode, state=state)
    life.open(config, resume=False)
    life.begin(config, "cpu", 0)
    for i in (10, 20, 30):
        life.log({"kind": "train", "iteration": i})
    life.counters["replica_failures"] = 2
    life.save_state(config, {"steps": 20})
    return config


def test_resume_continues_from_the_state_and_drops_later_records(tmp_path):
    config = _saved_run(tmp_path)
    life = RunLifecycle(tmp_path, mode="downpour", state="downpour")
    saved = life.open(config.replace(iterations=2000), resume=True, same=("replicas",))
    assert saved["steps"] == 20 and saved["mode"] == "downpour"
    life.begin(config.replace(iterations=2000), "cpu", 20, saved)
    assert life.counters["replica_failures"] == 2
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [10, 20, 20]
    assert records[-1] == {"kind": "resume", "iteration": 20}
    assert RunLifecycle(tmp_path, mode="x", state="y").run.read_config().iterations == 2000


def test_opening_refuses_what_cannot_be_started_or_continued_and_writes_nothing(tmp_path):
    config = _saved_run(tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    cases = [
        (dict(mode="downpour", state="downpour"), config, False, (), ConfigError,
         "already holds a run"),
        (dict(mode="single", state="last"), config, True, (), CheckpointError,
         "holds a downpour run"),
        (dict(mode="downpour", state="downpour"), config.replace(replicas=3), True,
         ("replicas",), CheckpointError, "was trained with --replicas 2, not 3"),
    ]
    for where, c, resume, same, error, message in cases:
        with pytest.raises(error, match=message):
            RunLifecycle(tmp_path / "run", **where).open(c, resume, same)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        RunLifecycle(tmp_path / "empty", mode="single", state="last").open(config, True)
    with pytest.raises(ConfigError, match="--resume needs --out"):
        RunLifecycle(None, mode="single", state="last").open(config, True)
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    (tmp_path / "run/checkpoints/downpour.pt").rename(tmp_path / "run/checkpoints/last.pt")
    with pytest.raises(CheckpointError, match="downpour.pt is missing"):
        RunLifecycle(tmp_path / "run", mode="downpour", state="downpour").open(config, True)
    assert not (tmp_path / "empty").exists()


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    config = get_recipe("digits")
    life = RunLifecycle(tmp_path, mode="single", state="last")
    life.open(config, resume=False)
    life.begin(config, "cpu", 0)
    life.log({"kind": "train", "iteration": 25})
    again = RunLifecycle(tmp_path, mode="single", state="last")
    assert again.open(config, resume=True) is None
    again.begin(config, "cpu", 0)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"kind": "resume", "iteration": 0}]


def test_ctrl_c_requests_a_stop_and_a_second_one_aborts():
    life = RunLifecycle(None, mode="single", state="last")
    original = signal.getsignal(signal.SIGINT)
    with life.signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert life.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is original


class _Failing:
    """A scheme whose start fails half-way (say, Ray started, the actors could not be)."""

    def __init__(self):
        self.closed = False

    def start(self):
        raise DistbeliefError("cannot place the replicas")

    def close(self):
        self.closed = True


def test_fit_closes_the_scheme_whatever_happens():
    scheme = _Failing()
    with pytest.raises(DistbeliefError, match="cannot place"):
        RunLifecycle(None, mode="single", state="last").fit(scheme)
    assert scheme.closed


def test_fit_evaluates_the_final_parameters_once(tmp_path):
    from distbelief.engine import Trainer

    config = get_recipe("digits").replace(iterations=6, batch_size=32, eval_every=3,
                                          log_every=3, device="cpu")
    summary = Trainer(config, tmp_path).fit()
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [3, 6]  # 6: by the cadence, not again at the end
    assert summary["test_error"] == evals[-1]["error"] and evals[-1]["examples"] == 6 * 32
    assert summary["mode"] == "single" and summary["iterations"] == 6
    assert torch.isfinite(torch.tensor(summary["test_loss"]))


def test_saved_state_carries_the_clock_counters_and_config(tmp_path):
    from distbelief.engine.checkpoint import load_checkpoint

    config = _saved_run(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints/downpour.pt")
    assert state["counters"] == {"replica_failures": 2} and state["mode"] == "downpour"
    assert state["config"] == config.to_dict() and state["wall_s"] >= 0
    save_checkpoint(tmp_path / "checkpoints/other.pt", {"x": 1})  # unrelated files are ignored
