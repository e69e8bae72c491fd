"""`distbelief train --mode sandblaster` as a user runs it: its own local Ray, Ctrl-C and
--resume, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distbelief.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # the command starts its own


# make test-all. make test runs the command with a Ray of its own in downpour mode
# (test_cli_downpour.py), and Sandblaster end to end through Ray in process
# (sandblaster/test_trainer.py, parity/test_sandblaster.py).
@pytest.mark.slow
def test_sandblaster_command_trains_evaluates_and_leaves_no_ray_behind(tmp_path, capsys,
                                                                       ray_watch):
    before = ray_watch.processes()
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "distbelief", "train", "--recipe",
                           "digits-sandblaster", "--iterations", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("softmax on digits (Sandblaster L-BFGS, 2 replicas, 2 shards, "
                           "32 portions): test accuracy"), last
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 8 and summary["mode"] == "sandblaster"
    assert sum(summary["portions_per_replica"]) == 32 * summary["evaluations"]
    assert not ray_watch.new_since(before), "Ray processes outlived the command"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoints/last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == pytest.approx(summary["test_error"])
    assert main(["plot", str(out), "--x", "wall", "-o", str(tmp_path / "f.png")]) == 0


# 40 s of a Ray start, training, a stop and a resume in a child process. In make test
# Sandblaster's stop and a resume that retraces the run are in process
# (sandblaster/test_trainer.py), and Ctrl-C reaches the command as in single mode.
@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_checkpoints_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    # Batches of 256 change every iteration, so L-BFGS does not stop on its own.
    cmd = [sys.executable, "-m", "distbelief", "train", "--recipe", "digits-sandblaster",
           "--model", "mlp", "--batch-size", "256", "--quiet", "--out", str(out),
           "--eval-every", "0"]
    proc = subprocess.Popen([*cmd, "--iterations", "100000"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3):
        assert proc.poll() is None and time.time() < deadline, "training never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    from distbelief.engine import load_checkpoint
    from distbelief.engine.rundir import RunDir

    stopped = load_checkpoint(RunDir(out).state_file("sandblaster"))["iteration"]
    done = subprocess.run([*cmd, "--resume", "--iterations", str(stopped + 3)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == stopped + 3
    iterations = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()
                  if '"kind": "train"' in line]
    assert iterations == list(range(stopped + 4))  # nothing repeated, nothing missing


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet20"], "needs a model without BatchNorm"),
    (["--portions", "0"], "--portions must be positive"),
    (["--portions", "5000"], "--portions 5000 exceeds the 1437 images"),
    (["--line-search", "armijo"], "line search"),
    (["--dtype", "float16"], "dtype"),
    (["--straggler-delay", "-1"], "--straggler-delay must be >= 0"),
    (["--ps-shards", "700"], "--ps-shards 700 exceeds the model's 650 parameters"),
    (["--address", "127.0.0.1:1"],
     "the Ray cluster at 127.0.0.1:1 does not answer: nothing listens there"),
])
def test_bad_sandblaster_input_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits-sandblaster", "--out", str(out), "--quiet",
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_imagenet_is_refused(tmp_path, capsys):
    argv = ["train", "--recipe", "digits-sandblaster", "--data", "imagenet", "--data-dir",
            str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    assert "needs an in-memory dataset" in capsys.readouterr().err


def test_resume_refuses_other_modes(tmp_path, capsys):
    from distbelief.engine.checkpoint import save_checkpoint
    from distbelief.engine.rundir import RunDir
    from distbelief.recipes import get_recipe

    config = get_recipe("digits-sandblaster")
    run = RunDir(tmp_path / "run")
    run.create(config, "cpu")
    save_checkpoint(run.state_file("sandblaster"), {"config": config.to_dict()})
    save_checkpoint(run.checkpoint, {"config": config.to_dict(), "mode": "sandblaster"})
    before = {p.name: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    before[".lock"] = b""  # taken (and written) before anything is read: the one writer
    for argv, message in ((["--mode", "downpour"], "holds a sandblaster run"),
                          (["--mode", "single"], "holds a sandblaster run"),
                          (["--model", "mlp"], "was trained with --model softmax, not mlp")):
        assert main(["train", "--out", str(run.path), "--resume", "--quiet", *argv]) == 2
        assert message in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert before == {**after, ".lock": b""} and after[".lock"].startswith(b"pid ")
