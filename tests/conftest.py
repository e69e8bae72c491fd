"""Fixtures and tiers shared by the whole suite.

Tiers (markers; `make test-fast`, `make test`, `make test-all`):
- `ray`: starts or uses Ray (through the shared `ray_cluster`, a cluster of its own, or a
  trainer that starts one); `subprocess`: runs a child process (the CLI, an example script,
  worker processes); `slow`: a minute or more; `gpu`: needs CUDA (skipped without one).
- `make test-fast` runs `--pure`: everything but those, and fails a test that starts Ray or a
  Python child process anyway, so the fast tier stays what it says (mark the test instead).
  Small tools stay allowed (the run directory asks git for the revision).
"""

import multiprocessing.process
import os
import subprocess
import sys
import time

import pytest
import torch

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (an actor
# more); for a test run of seconds, poll every half second and skip the watcher. Set before any
# Ray starts, so that every process of the run sees it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_addoption(parser):
    parser.addoption("--pure", action="store_true",
                     help="only tests that start neither Ray nor a child process (make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if config.getoption("--pure"):
        kept = [i for i in items if not ({"ray", "subprocess", "slow", "gpu"} & i.keywords.keys())]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _pure_means_pure(request, monkeypatch):
    """Under --pure, a test that starts a child process or Ray fails, naming the marker it
    lacks."""
    if not request.config.getoption("--pure"):
        yield
        return

    popen = subprocess.Popen.__init__

    def refuse(*args, **kwargs):
        raise RuntimeError("this test starts a child process: mark it subprocess")

    def only_tools(self, args, *rest, **kwargs):
        program = os.path.basename(str(args if isinstance(args, (str, bytes)) else args[0]))
        if "python" in program or "distbelief" in program or "ray" in program:
            refuse()
        popen(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", only_tools)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started Ray: mark it ray")


class RayWatch:
    """Ray's daemons and workers on this machine, to check that a command stopped its own."""

    KEYS = ("gcs_server", "raylet", "ray::", "default_worker.py", "log_monitor.py",
            "plasma_store")

    def processes(self) -> set[int]:
        pids = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(key in cmd for key in self.KEYS):
                pids.add(int(entry))
        return pids

    def new_since(self, before: set[int], timeout_s: float = 20.0) -> set[int]:
        """Ray processes not in `before` still alive after up to `timeout_s` seconds."""
        deadline = time.time() + timeout_s
        while (left := self.processes() - before) and time.time() < deadline:
            time.sleep(0.5)
        return left


@pytest.fixture
def ray_watch():
    """Ray's processes, with no Ray in this process: the shared cluster is stopped first, so
    that what the command under test starts and stops is its own."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    return RayWatch()


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the shared local Ray down at the end of the run, if one is up."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """The small local Ray shared by the whole test run (Ray's advice: starting one costs
    seconds), started on first use and again after a test that needed its own."""
    ray = pytest.importorskip("ray")
    from distbelief.distributed.runtime.startup import start_ray

    if not ray.is_initialized():
        # "local": a new Ray of our own, never one a RAY_ADDRESS or
        # /tmp/ray/ray_current_cluster (another test cluster, another user) points at.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR",
                 runtime_env={"worker_process_setup_hook":
                              "distbelief.distributed.quiet.quiet_worker"})
    start_ray()  # no-op here: the trainer under test must reuse this cluster
    return ray


@pytest.fixture
def torch_as_it_was():
    """For tests that set torch's threads or determinism the way the trainer under test needs
    them: later tests in this process find torch as it was."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
