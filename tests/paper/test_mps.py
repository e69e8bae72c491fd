"""CUDA MPS for `reproduce --parallel` (paper/mps.py), driven through a stand-in for NVIDIA's
control program: the daemon is started with its own pipe and log folders, the children's
environment points at it, and it is quit and the environment restored at the end; where it
cannot start, the runs go on without it and say why."""

import os
import stat
import textwrap

import pytest
import torch

from distbelief.paper.mps import Mps
from distbelief.paper.runner import Runner, RunSpec
from distbelief.recipes import get_recipe


@pytest.fixture
def control(tmp_path, monkeypatch):
    """A stand-in nvidia-cuda-mps-control on PATH that logs each call (argv, the pipe
    directory it was given, stdin) and exits with the status in STANDIN_STATUS."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-cuda-mps-control"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        input=""
        if [ "$#" -eq 0 ]; then input=$(cat); fi
        echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY in=$input" >> {log}
        if [ "${{STANDIN_STATUS:-0}}" != 0 ]; then echo "MPS refused: compute mode" >&2; fi
        exit ${{STANDIN_STATUS:-0}}
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setenv("CUDA_MPS_LOG_DIRECTORY", "/kept/log")
    return log


def _calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_a_daemon_of_our_own_is_started_for_the_children_and_quit_after(control):
    mps = Mps.start()
    assert mps.running and "started a daemon" in mps.note
    pipe, log_dir = os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"]
    assert os.path.isdir(pipe) and os.path.isdir(log_dir) and log_dir != "/kept/log"
    assert _calls(control) == [f"args=-d pipe={pipe} log={log_dir} in="]
    mps.stop()
    assert _calls(control)[1] == f"args= pipe={pipe} log={log_dir} in=quit"
    # The environment is as it was (an earlier value restored, an unset one unset again).
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert os.environ["CUDA_MPS_LOG_DIRECTORY"] == "/kept/log"
    assert not os.path.exists(os.path.dirname(pipe))
    mps.stop()  # twice is harmless: quit once
    assert len(_calls(control)) == 2


def test_a_daemon_already_named_is_used_and_left_running(control, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/run/mps")
    mps = Mps.start()
    assert not mps.running and "using the daemon at /run/mps" in mps.note
    mps.stop()
    assert _calls(control) == [] and os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"


def test_without_mps_the_runs_go_on_and_the_note_says_why(control, monkeypatch):
    monkeypatch.setenv("STANDIN_STATUS", "1")
    mps = Mps.start()
    assert not mps.running and "did not start (MPS refused: compute mode)" in mps.note
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "not found; the runs time-slice the GPU" in Mps.start().note


def test_the_runner_starts_mps_only_for_children_on_a_gpu(control, monkeypatch, tmp_path):
    config = get_recipe("digits").replace(iterations=1)
    lines = []
    runner = Runner(tmp_path, parallel=2, say=lines.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu = runner._share_gpu([RunSpec("a", config.replace(device="cpu"))])
    assert not cpu.running and lines == [] and _calls(control) == []
    gpu = runner._share_gpu([RunSpec("a", config.replace(device="cuda"))])
    try:
        assert gpu.running and lines == [gpu.note] and "started a daemon" in lines[0]
    finally:
        gpu.stop()
