"""Ray's lifetime for a run: starting a local Ray or joining a cluster, and leaving it.

Besides the actor modules, the runtime package is the only place that imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading

import ray
import ray._private.services  # noqa: F401 - for _own_process_groups

from distbelief.engine.lifecycle import describe
from distbelief.errors import DistbeliefError


def start_ray(address: str | None = None, dashboard: bool = False) -> bool:
    """Make sure this process is connected to Ray; returns True when it connected here (the
    caller then calls `ray.shutdown()`), False when Ray was already initialized (tests share
    one local cluster for the whole run).

    Without `address` a local Ray starts on the loopback address (its processes reach each
    other at 127.0.0.1; Ray 2.60 offers no way to stop its gRPC servers also listening on other
    interfaces, which its token authentication guards), sized to this machine, without the
    dashboard unless `dashboard`. With `address` ("host:port" or "auto") it joins that
    cluster. Token authentication stays as Ray configures it.
    """
    if ray.is_initialized():
        return False
    # Ray announces at every start that token authentication is on; it stays on, quietly.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    options = {"logging_level": logging.WARNING, "log_to_driver": True,
               "runtime_env": {"worker_process_setup_hook":
                               "distbelief.distributed.quiet.quiet_worker"}}
    if address:
        check_reachable(address)
        options["address"] = address
    else:
        # "local": always a new local Ray, never one found through RAY_ADDRESS or the
        # current-cluster file a `ray start` left behind.
        options.update(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard,
                       _node_ip_address="127.0.0.1")
    with _keep_sigterm_handler(), _own_process_groups(local=not address):
        try:
            ray.init(**options)
        except Exception as e:  # noqa: BLE001 - whatever Ray's start raises is one line
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise DistbeliefError(f"cannot {where} ({describe(e)[:160]})") from None
    return True


@contextlib.contextmanager
def _own_process_groups(local: bool):
    """Within: the processes a local Ray starts (GCS, raylet, their agents) go in process groups
    of their own. In the driver's group, a SIGTERM sent to the group (SLURM's scancel, a
    supervisor stopping a job) would stop them while the driver still needs them to
    checkpoint; so only the driver hears it, checkpoints, and stops them itself. They still die
    with the driver if it is killed (Ray's fate-sharing). Ray has no option for this, so its
    Popen subclass is wrapped while ray.init runs; on other systems, or if that class moves,
    nothing changes."""
    popen = getattr(ray._private.services, "ConsolePopen", None)
    if not (local and popen is not None and sys.platform.startswith("linux")):
        yield
        return
    original = popen.__init__

    def init(self, *args, **kwargs):
        ray_preexec = kwargs.get("preexec_fn")

        def preexec():
            os.setpgid(0, 0)
            if ray_preexec is not None:
                ray_preexec()

        kwargs["preexec_fn"] = preexec
        original(self, *args, **kwargs)

    popen.__init__ = init
    try:
        yield
    finally:
        popen.__init__ = original


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the SIGTERM handler of the main thread with one that exits; the run
    lifecycle's handler (stop after this step, checkpoint) must stay."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool):
    """Within: connected to Ray (`start_ray`); on exit Ray is shut down if it started here."""
    started = start_ray(address, dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def pickle_by_value(module) -> None:
    """Ship `module`'s functions and classes to the workers by value rather than by name
    (for a user's module that the workers cannot import)."""
    ray.cloudpickle.register_pickle_by_value(module)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for a minute)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DistbeliefError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); "
                              f"start it with 'ray start --head' or drop --address") from None
