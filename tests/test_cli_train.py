"""`distbelief train`, `eval` and `plot` end to end on the digits, and their bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distbelief.cli import main

FAST = ["--iterations", "20", "--batch-size", "32", "--eval-every", "10", "--log-every", "5",
        "--quiet"]


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(out), *FAST]) == 0
    return out


def test_train_writes_the_run_and_ends_with_a_summary_line(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 20 and summary["model"] == "resnet20"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    out = run_dir.parent / "again"
    assert main(["train", "--out", str(out), *FAST, "--iterations", "5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("resnet20 on digits: test accuracy ") and str(out) in last


def test_resume_continues_with_more_iterations(run_dir, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--out", str(copy), "--resume", "--iterations", "25", "--quiet"]) == 0
    assert json.loads((copy / "summary.json").read_text())["iterations"] == 25


def test_eval_matches_the_training_summary(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["error"] == pytest.approx(summary["test_error"])
    assert result["images"] == 360


def test_eval_of_a_gpu_checkpoint_runs_on_this_machine(run_dir, tmp_path, capsys):
    import torch

    from distbelief.engine import load_checkpoint, save_checkpoint
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["config"]["device"] = "cuda"
    save_checkpoint(tmp_path / "gpu.pt", {k: v for k, v in state.items()
                                          if k not in ("format", "version")})
    assert main(["eval", "--checkpoint", str(tmp_path / "gpu.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 360
    if not torch.cuda.is_available():
        assert exit_code(["eval", "--checkpoint", str(tmp_path / "gpu.pt"), "--device",
                          "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_plot_writes_a_png(run_dir, tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert main(["plot", str(run_dir), str(run_dir), "-o", str(out), "--title", "t"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_against_wall_time_and_images(run_dir, tmp_path):
    from distbelief.engine.rundir import RunDir
    from distbelief.plot import run_curves

    batch = RunDir(run_dir).read_config().batch_size
    iterations = run_curves(run_dir)["train"][0]
    assert run_curves(run_dir, "examples")["train"][0] == tuple(i * batch for i in iterations)
    wall = run_curves(run_dir, "wall")["test"][0]
    assert list(wall) == sorted(wall) and wall[0] > 0
    assert main(["plot", str(run_dir), "--x", "wall", "-o", str(tmp_path / "f.svg")]) == 0


def test_a_sync_run_is_plotted_at_its_global_batch(tmp_path):
    from distbelief.engine.config import TrainConfig
    from distbelief.engine.rundir import RunDir
    from distbelief.plot import run_curves

    run = RunDir(tmp_path / "sync")
    run.create(TrainConfig().replace(mode="sync", replicas=3, batch_size=16), "cpu")
    run.log({"kind": "train", "iteration": 10, "error": 0.5, "wall_s": 1.0})
    run.log({"kind": "eval", "split": "test", "iteration": 10, "examples": 480, "error": 0.4,
             "wall_s": 1.5})
    curves = run_curves(run.path, "examples")
    assert curves["train"][0] == (10 * 16 * 3,) and curves["test"][0] == (480,)


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["train", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["train", "--batch-size", "lots"], "--batch-size: cannot read 'lots' as int"),
    (["train", "--recipe", "mnist"], "invalid recipe 'mnist'"),
    (["train", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["train", "--iterations", "5", "--epochs", "1"], "give --iterations or --epochs, not both"),
    (["train", "--resume"], "--resume needs --out RUN_DIR"),
    (["train", "--train-storage", "/shared/ray"], "--train-storage applies to --mode sync"),
    (["train", "--crop-size", "0"], "--crop-size must be positive, got 0"),
    (["train", "--recipe", "cifar10-paper", "--data-dir", "/nonexistent/cifar"],
     "CIFAR-10 folder /nonexistent/cifar does not exist"),
    (["train", "--data", "imagenet", "--data-dir", "/nonexistent/inet"],
     "/nonexistent/inet/train does not exist"),
    (["train", "--batch-size", "5000"], "--batch-size 5000 exceeds the 1437 training images"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    (["eval", "--checkpoint", "x.pt", "--scales", "224,big"], "--scales takes comma-separated"),
    (["plot", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here, but none may
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_checkpoints(run_dir, tmp_path, capsys):
    truncated = tmp_path / "t.pt"
    truncated.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:5000])
    assert exit_code(["eval", "--checkpoint", str(truncated)]) == 2
    assert "is corrupt, truncated" in capsys.readouterr().err
    assert exit_code(["eval", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
                      "--ten-crop"]) == 2
    assert "apply to imagenet data only" in capsys.readouterr().err
    assert exit_code(["eval", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
                      "--data", "synthetic"]) == 2
    assert "different data than the model was trained on" in capsys.readouterr().err


def test_train_into_an_existing_run_changes_nothing(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert exit_code(["train", "--out", str(run_dir), *FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


# make test-all. make test sends SIGTERM to the command (test_cli_signals.py), which takes the
# same path through the lifecycle as SIGINT (engine/test_lifecycle.py sends both).
@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path):
    """A real SIGINT to the real command: exit 130 with a checkpoint; --resume completes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distbelief", "train", "--out", str(out), "--quiet",
           "--batch-size", "16", "--log-every", "1", "--eval-every", "0"]
    proc = subprocess.Popen([*cmd, "--iterations", "100000"], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.stat().st_size > 0):  # training has started
        assert proc.poll() is None and time.time() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved, continue with --resume" in err and "Traceback" not in err
    from distbelief.engine import load_checkpoint
    stopped = load_checkpoint(out / "checkpoints" / "last.pt")["iteration"]
    done = subprocess.run([sys.executable, "-m", "distbelief", "train", "--out", str(out),
                           "--resume", "--quiet", "--iterations", str(stopped + 3)],
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["iterations"] == stopped + 3


def test_imagenet_folder_train_then_ten_crop_and_multiscale_eval(tmp_path, capsys):
    """The imagenet-paper recipe at toy sizes: train, then all three test views."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "inet" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(
                    tmp_path / "inet" / split / c / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "imagenet-paper", "--model", "resnet18", "--data-dir",
                 str(tmp_path / "inet"), "--crop-size", "32", "--scale-min", "36",
                 "--scale-max", "44", "--test-size", "36", "--batch-size", "4",
                 "--iterations", "3", "--num-workers", "0", "--out", str(out), "--quiet"]) == 0
    ckpt = str(out / "checkpoints" / "last.pt")
    for extra, views in (([], "center"), (["--ten-crop"], "tencrop"),
                         (["--scales", "32,40"], "multiscale")):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", ckpt, "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["views"] == views and result["images"] == 4
