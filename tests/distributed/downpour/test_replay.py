"""Replay of recorded Downpour runs in one process (--record-order; `distbelief replay`): the
record's contents, bit-for-bit replays of in-process runs, stopping early, refusals. No Ray
(tests/distributed/downpour/test_replay_ray.py replays real Ray runs)."""

import pytest
import torch

from distbelief import replay
from distbelief.api import trainer_for
from distbelief.cli import main
from distbelief.distributed.downpour.generation import load_snapshot
from distbelief.distributed.downpour.replay import Replay, ReplayError, incarnations
from distbelief.engine.rundir import RunDir
from distbelief.errors import CheckpointError

from tests.distributed.downpour.test_lockstep import lockstep_config


def recorded_run(path, **kw):
    config = lockstep_config(**{"replicas": 3, "record_order": True, "iterations": 30,
                                "eval_every": 0, "checkpoint_every": 0, "log_every": 15, **kw})
    trainer_for(config, path).fit()
    return config


def test_the_record_names_every_request_and_each_step_s_parameters(tmp_path):
    recorded_run(tmp_path / "run", n_push=2, n_fetch=2)
    history = load_snapshot(RunDir(tmp_path / "run"), 0)["history"]
    pushes = [op for op in history if op[0] == "push"]
    assert len(pushes) == 15  # 30 steps, two per push
    # Each push holds its two steps and the one fetch they computed on; a replica's pushes come in
    # the order of its sequence numbers, its steps in order.
    for op in pushes:
        (s0, f0), (s1, f1) = op[4]
        assert s1 == s0 + 1 and f0 == f1 and f0 < op[3]
    for inc in incarnations([history]).values():
        assert [s for s, _ in inc.steps] == list(range(10))
    # Every step installs what a pull served that replica before it.
    pulls = {(op[2], op[3]) for op in history if op[0] == "pull"}
    assert all((op[2], f) in pulls for op in pushes for _, f in op[4])


def test_an_in_process_run_replays_bit_for_bit_and_stops_where_asked(tmp_path):
    recorded_run(tmp_path / "run", n_push=2, n_fetch=2)
    report = replay(tmp_path / "run", out=tmp_path / "replayed.pt")
    assert report["equal"] and report["max_abs_diff"] == 0.0, report
    assert (report["minibatches"], report["pushes"], report["incarnations"]) == (30, 30, 3)
    # Stopping at 12 minibatches is the state of a run of 12.
    recorded_run(tmp_path / "short", n_push=2, n_fetch=2, iterations=12)
    short = load_snapshot(RunDir(tmp_path / "short"), 1)["w"]
    from distbelief.distributed.downpour.replay import replay_run

    early, report = replay_run(tmp_path / "run", until=12)
    assert report["minibatches"] == 12
    assert torch.equal(early.shards[1].w, torch.as_tensor(short))
    assert main(["replay", str(tmp_path / "run"), "--until", "12"]) == 0


def test_a_wrong_order_is_refused_not_replayed(tmp_path):
    config = recorded_run(tmp_path / "run")
    from distbelief.distributed.downpour.replay import replay_run

    replayed, _ = replay_run(tmp_path / "run")
    histories = [load_snapshot(RunDir(tmp_path / "run"), k)["history"] for k in range(2)]
    # A push moved before the pull its gradient was computed on: no execution can do that.
    first_push = next(i for i, op in enumerate(histories[0]) if op[0] == "push")
    bad = [histories[0][first_push], *histories[0][:first_push],
           *histories[0][first_push + 1:]]
    with pytest.raises(ReplayError, match="cannot be re-executed"):
        Replay(config, replayed.data, [bad, histories[1]], [0, 0]).run()
    with pytest.raises(ReplayError, match="starts at a checkpoint"):
        Replay(config, replayed.data, histories, [0, 5])


def test_replay_refuses_runs_without_a_record_in_one_line(tmp_path, capsys):
    trainer_for(lockstep_config(replicas=2, iterations=8, eval_every=0), tmp_path / "plain").fit()
    with pytest.raises(CheckpointError, match="--record-order"):
        replay(tmp_path / "plain")
    assert main(["replay", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--record-order" in err[0]
    recorded_run(tmp_path / "run")
    (tmp_path / "taken.pt").write_text("mine")
    assert main(["replay", str(tmp_path / "run"), "--out", str(tmp_path / "taken.pt")]) == 2
    assert (tmp_path / "taken.pt").read_text() == "mine"
    assert main(["replay", str(tmp_path / "run"), "--until", "0"]) == 2
    assert main(["replay", str(tmp_path / "nowhere")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("distbelief: error:") for e in errors)
