"""The run lifecycle every mode shares: cadence, the failure book, opening and resuming run
directories, signals, and fit's guarantees (close always runs; the final evaluation)."""

import os
import signal

import pytest
import torch

from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.failures import FailureBook
from distbelief.engine.lifecycle import Cadence, RunLifecycle, stop_on_signals
from distbelief.engine.rundir import read_jsonl
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError
from distbelief.recipes import get_recipe
from support.runs import at


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
    life.begin(at(get_recipe("digits-downpour"), 0))
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
    life.begin(at(config, 0))
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
    assert life.counters["replica_failures"] == 2
    life.begin(at(config.replace(iterations=2000), 20))
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
    life.begin(at(config, 0))
    life.log({"kind": "train", "iteration": 25})
    life.release()  # the first process ended
    again = RunLifecycle(tmp_path, mode="single", state="last")
    assert again.open(config, resume=True) is None
    again.begin(at(config, 0))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"kind": "resume", "iteration": 0}]


@pytest.mark.parametrize("first, second, abort", [
    (signal.SIGINT, signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, signal.SIGTERM, SystemExit),
    (signal.SIGTERM, signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_requests_a_stop_and_a_second_one_aborts(first, second, abort):
    life = RunLifecycle(None, mode="single", state="last")
    original = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(life):
        os.kill(os.getpid(), first)
        assert life.stop_requested and life.stop_signal == first
        assert life.interrupted(7).signum == first
        with pytest.raises(abort) as raised:
            os.kill(os.getpid(), second)
    if abort is SystemExit:
        assert raised.value.code == 143
    assert {s: signal.getsignal(s) for s in original} == original


class _Failing:
    """A scheme whose start fails half-way (say, Ray started, the actors could not be)."""

    def __init__(self):
        self.closed = False

    def start(self):
        raise DistbeliefError("cannot place the replicas")

    def close(self):
        self.closed = True


def test_a_scheme_that_cannot_start_is_closed_and_writes_nothing(tmp_path):
    scheme = _Failing()
    life = RunLifecycle(tmp_path / "run", mode="single", state="last")
    life.open(get_recipe("digits"), resume=False)
    with pytest.raises(DistbeliefError, match="cannot place"):
        life.fit(scheme)
    assert scheme.closed and not (tmp_path / "run").exists()


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
    config = _saved_run(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints/downpour.pt")
    assert state["counters"] == {"replica_failures": 2} and state["mode"] == "downpour"
    assert state["config"] == config.to_dict() and state["wall_s"] >= 0
    save_checkpoint(tmp_path / "checkpoints/other.pt", {"x": 1})  # unrelated files are ignored


def test_a_distributed_checkpoint_is_one_generation_published_by_its_manifest(tmp_path):
    config = get_recipe("digits-downpour")
    life = RunLifecycle(tmp_path, mode="downpour", state="downpour")
    life.open(config, resume=False)
    life.begin(at(config, 0))
    model = {"config": config.to_dict(), "model": {"w": torch.zeros(2)}, "iteration": 10}
    life.save_generation(config, {"steps": 10}, {"shard-0": {"shard": {"v": 10}}, "last": model},
                         10)
    life.save_generation(config, {"steps": 20}, {"shard-0": {"shard": {"v": 20}},
                                                 "last": {**model, "iteration": 20}}, 20)
    run = life.run
    assert [p.name for p in run.checkpoints.glob("gen-*")] == ["gen-000002"]  # older: removed
    # A crash while the third was being written: a folder, no manifest naming it.
    torn = run.checkpoints / "gen-000003"
    torn.mkdir()
    (torn / "downpour.pt").write_bytes(b"half a file")
    life.release()
    again = RunLifecycle(tmp_path, mode="downpour", state="downpour")
    saved = again.open(config, resume=True)
    assert saved["steps"] == 20 and run.state_file("shard-0").parent.name == "gen-000002"
    assert load_checkpoint(run.state_file("shard-0"))["shard"] == {"v": 20}
    assert load_checkpoint(run.checkpoint)["iteration"] == 20  # last.pt, for `distbelief eval`
    again.begin(at(config, 20))
    again.save_generation(config, {"steps": 30}, {"shard-0": {"shard": {"v": 30}}}, 30)
    # A new number, past the torn folder's (which goes with the older generations).
    assert [p.name for p in run.checkpoints.glob("gen-*")] == ["gen-000004"]
    assert load_checkpoint(run.state_file("downpour"))["steps"] == 30
