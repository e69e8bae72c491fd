"""CUDA MPS for `reproduce --parallel K`: K training processes that share one GPU at once.

Without MPS, processes on one GPU time-slice it: each has its own context and the GPU runs one
context's kernels at a time, so K small nets (each far from filling an H100) take about K times
as long as one. Under the Multi-Process Service their kernels run side by side.

`Mps.start()` starts a daemon of our own (`nvidia-cuda-mps-control -d`, no root needed) with
its pipe and log directories in a new temporary folder (short: the pipe is a Unix socket, whose
path is limited to ~100 bytes), and points the environment that the child
processes inherit at it; `stop()` quits it and restores the environment. A daemon that the
environment already names (CUDA_MPS_PIPE_DIRECTORY) is used as it is and left running. Where
MPS cannot start (no control program, the GPU in a mode that refuses it), the runs go on
without it and `note` says why.

Not yet run on a GPU (none was lent to the session that wrote it); the control protocol is
tested with a stand-in program in tests/paper/test_mps.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


class Mps:
    """A CUDA MPS daemon for the child processes of one `reproduce --parallel` call."""

    def __init__(self, note: str, env: dict[str, str] | None = None,
                 saved: dict[str, str | None] | None = None):
        self.note, self._env, self._saved = note, env, saved

    @property
    def running(self) -> bool:
        """Whether this object started a daemon (and so must stop it)."""
        return self._env is not None

    @classmethod
    def start(cls) -> "Mps":
        """Start a daemon (or use the one named by the environment)."""
        if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
            return cls(f"CUDA MPS: using the daemon at {os.environ['CUDA_MPS_PIPE_DIRECTORY']}")
        control = shutil.which(CONTROL)
        if control is None:
            return cls(f"CUDA MPS: {CONTROL} not found; the runs time-slice the GPU")
        folder = Path(tempfile.mkdtemp(prefix="distbelief-mps-"))
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
               "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        for path in env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([control, "-d"], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return cls(f"CUDA MPS did not start ({e}); the runs time-slice the GPU")
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[:1] or [
                f"status {done.returncode}"]
            return cls(f"CUDA MPS did not start ({why[0]}); the runs time-slice the GPU")
        saved = {name: os.environ.get(name) for name in ENV}
        os.environ.update(env)  # inherited by the child processes started from now on
        return cls(f"CUDA MPS: started a daemon ({folder}); the runs share the GPU", env,
                   saved)

    def stop(self) -> None:
        """Quit a daemon this object started and restore the environment; else nothing."""
        if not self.running:
            return
        control = shutil.which(CONTROL)
        try:
            if control:
                subprocess.run([control], input="quit\n", env={**os.environ, **self._env},
                               capture_output=True, text=True, timeout=30)
        finally:
            shutil.rmtree(Path(self._env["CUDA_MPS_PIPE_DIRECTORY"]).parent, ignore_errors=True)
            for name, value in self._saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._env = None
