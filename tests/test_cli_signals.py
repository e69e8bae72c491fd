"""What clusters do to long jobs, done to the real command: SIGTERM (to the whole process
group, as SLURM does, at a random point) checkpoints, stops Ray quietly and exits 143; SIGKILL
loses at most the time since the last checkpoint; --resume then finishes the run with a
metrics history that never repeats an iteration."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from distbelief.engine import load_checkpoint
from distbelief.engine.rundir import RunDir, read_jsonl

pytest.importorskip("ray")
pytestmark = pytest.mark.subprocess
MODES = {
    "single": ["--recipe", "digits", "--deterministic", "--device", "cpu",
               "--checkpoint-every", "20"],
    "downpour": ["--recipe", "digits-downpour", "--checkpoint-every", "60"],
    "sandblaster": ["--recipe", "digits-sandblaster", "--model", "mlp", "--batch-size", "256",
                    "--checkpoint-every", "4"],
    "sync": ["--recipe", "digits", "--mode", "sync", "--replicas", "2", "--checkpoint-every",
             "20"],
}
STATE = {"single": "last", "downpour": "downpour", "sandblaster": "sandblaster", "sync": "last"}


def command(out, mode, *more):
    return [sys.executable, "-m", "distbelief", "train", *MODES[mode], "--quiet", "--out",
            str(out), "--log-every", "5", "--eval-every", "0", *more]


def start_and_wait(out, mode, records: int, iterations: int):
    """The command in a session of its own, once `records` training records are written."""
    proc = subprocess.Popen(command(out, mode, "--iterations", str(iterations)),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= records):
        assert proc.poll() is None and time.time() < deadline, "training never got that far"
        time.sleep(0.05)
    return proc


def assert_history_never_repeats(out, iterations: int):
    records = read_jsonl(out / "metrics.jsonl")
    train = [r["iteration"] for r in records if r["kind"] == "train"]
    evals = [r["iteration"] for r in records if r["kind"] == "eval" and r["split"] == "test"]
    for seen in (train, evals):
        assert seen == sorted(set(seen)), seen  # strictly increasing per kind
    assert train[-1] == iterations and evals[-1] == iterations


# make test runs single mode's: the signal reaches every mode's lifecycle the same way, and each
# distributed mode's stop and resume runs in process there (downpour/test_trainer.py,
# sandblaster/test_trainer.py, sync/test_sync_ray.py). The distributed modes' runs, a Ray start
# and a minute of training each, are in make test-all.
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow)
                                  if m != "single" else m for m in MODES])
def test_sigterm_checkpoints_stops_quietly_and_resume_finishes(tmp_path, ray_watch, mode):
    rng = random.Random(mode)
    before = ray_watch.processes()
    out, total = tmp_path / "run", {"single": 60, "downpour": 300, "sandblaster": 14,
                                  "sync": 80}[mode]
    proc = start_and_wait(out, mode, records=rng.randint(1, 3), iterations=total)
    time.sleep(rng.uniform(0, 0.5))  # anywhere: in a step, a checkpoint, an evaluation
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert "SIGTERM received" not in err and "logging.cc" not in err  # no Ray crash dumps
    assert not ray_watch.new_since(before), "Ray processes outlived SIGTERM"
    stopped = load_checkpoint(RunDir(out).state_file(STATE[mode]))
    at = stopped.get("iteration", stopped.get("steps"))
    assert 0 < at < total
    done = subprocess.run(command(out, mode, "--resume", "--iterations", str(total)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["iterations"] == total
    assert_history_never_repeats(out, total)
    if mode == "single":  # deterministic on the CPU: as if it had never stopped
        from distbelief.engine import Trainer
        from distbelief.recipes import get_recipe

        straight = Trainer(get_recipe("digits").replace(
            deterministic=True, device="cpu", iterations=total, checkpoint_every=20))
        straight.train_until(total)
        resumed = load_checkpoint(out / "checkpoints/last.pt")["model"]
        for name, value in straight.model.state_dict().items():
            assert torch.equal(resumed[name], value), name


@pytest.mark.slow  # ~2 min; make test-all
def test_sigkill_loses_at_most_the_time_since_the_last_checkpoint(tmp_path, ray_watch):
    """The driver killed outright (no signal to catch): Ray's processes die with it, and
    --resume continues from the newest complete checkpoint generation."""
    before = ray_watch.processes()
    out = tmp_path / "run"
    proc = start_and_wait(out, "downpour", records=16, iterations=300)  # past checkpoint 60
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # The raylet dies with the driver (Ray's fate sharing); its agents notice within a minute.
    assert not ray_watch.new_since(before, timeout_s=90), "Ray processes outlived the driver"
    saved = load_checkpoint(RunDir(out).state_file("downpour"))
    losses = {r["iteration"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")
              if r["kind"] == "train"}
    done = subprocess.run(command(out, "downpour", "--resume", "--iterations", "300"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert {"kind": "resume", "iteration": saved["steps"]} in records
    after = [r for r in records if r["kind"] == "train" and r["iteration"] > saved["steps"]]
    # It goes on from the checkpoint's parameters, not from a fresh start (loss ~2.3).
    assert after[0]["loss"] < max(1.2, 2 * losses[saved["steps"]]), (after[0], losses)
    assert_history_never_repeats(out, 300)


@pytest.mark.parametrize("signum, status, line", [
    (signal.SIGINT, 130, "distbelief: interrupted"),
    (signal.SIGTERM, 143, "distbelief: terminated (SIGTERM)")])
def test_a_signal_while_the_command_starts_is_one_line_and_writes_nothing(tmp_path, signum,
                                                                          status, line):
    """While torch is imported and the data loaded: before, a KeyboardInterrupt traceback or a
    silent death by SIGTERM."""
    out = tmp_path / "run"
    # SIGINT's default restored in the child: a shell running the tests in the background (as
    # CI may) ignores it for its children, and a child that starts with it ignored keeps it so.
    proc = subprocess.Popen(command(out, "single", "--iterations", "50"),
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.8)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.splitlines()) == (status, [line]), err
    assert not out.exists()


def test_sigterm_while_ray_starts_stops_with_nothing_written(tmp_path, ray_watch):
    """ray.init installs a SIGTERM handler that exits with status 15 at once, Ray half
    started; the run's own handler holds instead, and the run stops before its first write."""
    before = ray_watch.processes()
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, "downpour", "--iterations", "100"),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not any("gcs_server" in _cmdline(p) for p in ray_watch.processes() - before):
        assert proc.poll() is None and time.time() < deadline, "Ray never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the driver only: Ray is still starting
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "distbelief: stopped before training began; nothing was " \
                                   "written", err
    assert "Traceback" not in err
    assert not out.exists()
    assert not ray_watch.new_since(before), "Ray processes outlived SIGTERM"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""
