import os
import time

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
    return RayWatch()


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray per test module (Ray's advice: starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    from distbelief.distributed.runtime import start_ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": a new Ray of our own, never one a RAY_ADDRESS or /tmp/ray/ray_current_cluster
    # (another test cluster, another user on this machine) points at.
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"worker_process_setup_hook":
                          "distbelief.distributed.quiet.quiet_worker"})
    start_ray()  # no-op here: the driver must reuse this cluster, not start its own
    yield ray
    ray.shutdown()


@pytest.fixture
def torch_as_it_was():
    """For tests that set torch's threads or determinism the way the trainer under test needs
    them: later tests in this process find torch as it was."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
