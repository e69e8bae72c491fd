"""`distbelief train --mode downpour` as a user runs it: its own local Ray, started and stopped
by the command; Ctrl-C to the whole process group; one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distbelief.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # the command starts its own

QUICK = ["--recipe", "digits-downpour", "--iterations", "150", "--milestones", "100",
         "--eval-every", "0", "--log-every", "25"]


def test_downpour_command_trains_evaluates_and_leaves_no_ray_behind(tmp_path, capsys, ray_watch):
    before = ray_watch.processes()
    out = tmp_path / "run"
    # Without --address the command starts its own Ray, whatever RAY_ADDRESS (or a cluster file
    # left by an ended `ray start`) says.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "distbelief", "train", *QUICK, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("resnet20 on digits (Downpour, 2 replicas, 2 shards): test accuracy")
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 150 and summary["mode"] == "downpour"
    assert not ray_watch.new_since(before), "Ray processes outlived the command"
    # The server's model is an ordinary checkpoint for `distbelief eval`.
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoints/last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == pytest.approx(summary["test_error"])
    # Error against images processed, beside a single-process run (DistBelief Fig. 4 view).
    from distbelief.plot import run_curves

    curve = run_curves(out, "examples")
    assert curve["label"] == "resnet20 (Downpour x2, sgd)" and curve["test"][0][-1] == 150 * 64
    assert main(["plot", str(out), "--x", "examples", "-o", str(tmp_path / "f.png")]) == 0


# A minute of a Ray start, training, a stop and a resume in a child process. In make test
# Downpour's stop and resume run in process (downpour/test_trainer.py), Ctrl-C and SIGTERM
# reach the command the same way in single mode (test_cli_train.py, test_cli_signals.py).
@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_checkpoints_stops_ray_and_resume_finishes(tmp_path, ray_watch):
    before = ray_watch.processes()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distbelief", "train", "--recipe", "digits-downpour", "--quiet",
           "--out", str(out), "--log-every", "10", "--eval-every", "0"]
    # Ctrl-C in a terminal signals the whole foreground process group: do the same.
    proc = subprocess.Popen([*cmd, "--iterations", "100000"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, "training never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert not ray_watch.new_since(before), "Ray processes outlived Ctrl-C"
    from distbelief.engine import load_checkpoint
    from distbelief.engine.rundir import RunDir

    stopped = load_checkpoint(RunDir(out).state_file("downpour"))["steps"]
    done = subprocess.run([*cmd, "--resume", "--iterations", str(stopped + 20)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["iterations"] == stopped + 20


@pytest.mark.parametrize("argv,message", [
    (["--mode", "downpour", "--replicas", "0"], "--replicas must be positive"),
    (["--address", "127.0.0.1:6379"], "--address and --dashboard apply to --mode downpour"),
    (["--mode", "downpour", "--address", "127.0.0.1:1"],
     "the Ray cluster at 127.0.0.1:1 does not answer: nothing listens there"),
    (["--mode", "downpour", "--ps-optimizer", "rmsprop"], "optimizer"),
    (["--mode", "downpour", "--warmstart-steps", "5000", "--iterations", "100"],
     "--warmstart-steps 5000 must be below"),
    (["--mode", "downpour", "--replicas", "40"], "40 replicas with batches of 64"),
    (["--mode", "downpour", "--lockstep", "--ssp-bound", "1"], "in --lockstep they take"),
    (["--ssp-bound", "2"], "--ssp-bound applies to --mode downpour"),
])
def test_bad_downpour_input_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_run_that_cannot_start_writes_nothing(tmp_path, capsys):
    """Ray started, but the replicas cannot be placed: one line, no run directory."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits-downpour", "--device", "cuda", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda but the Ray cluster has no GPUs" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_resume_refuses_another_shape_or_mode(tmp_path, capsys):
    from distbelief.engine.checkpoint import save_checkpoint
    from distbelief.engine.rundir import RunDir
    from distbelief.recipes import get_recipe

    config = get_recipe("digits-downpour")
    run = RunDir(tmp_path / "run")
    run.create(config, "cpu")
    save_checkpoint(run.state_file("downpour"), {"config": config.to_dict()})
    save_checkpoint(run.checkpoint, {"config": config.to_dict(), "mode": "downpour"})
    before = {p.name: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    before[".lock"] = b""  # taken (and written) before anything is read: the one writer
    for argv, message in ((["--replicas", "3"], "was trained with --replicas 2, not 3"),
                          (["--mode", "single"], "holds a downpour run")):
        assert main(["train", "--out", str(run.path), "--resume", "--quiet", *argv]) == 2
        assert message in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert before == {**after, ".lock": b""} and after[".lock"].startswith(b"pid ")
