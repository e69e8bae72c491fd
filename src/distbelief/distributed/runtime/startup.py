"""Ray's lifetime for a run: starting a local Ray or joining a cluster, and leaving it.

Besides the actor modules, the runtime package is the only place that imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import ray
import ray._private.services  # noqa: F401 - for _own_process_groups
import ray._private.utils  # noqa: F401 - for _keep_sigterm_handler

from distbelief.engine.lifecycle import describe
from distbelief.errors import DistbeliefError


def start_ray(address: str | None = None, dashboard: bool = False,
              connect_timeout_s: float = 10.0) -> bool:
    """Make sure this process is connected to Ray; returns True when it connected here (the
    caller then calls `ray.shutdown()`), False when Ray was already initialized (tests share
    one local cluster for the whole run).

    Without `address` a local Ray starts on the loopback address (its processes reach each
    other at 127.0.0.1; Ray 2.60 offers no way to stop its gRPC servers also listening on other
    interfaces, which its token authentication guards), sized to this machine, without the
    dashboard unless `dashboard`. With `address` ("host:port" or "auto") it joins that
    cluster, once it has answered as one within `connect_timeout_s` (`check_reachable`).
    Token authentication stays as Ray configures it.
    """
    if ray.is_initialized():
        return False
    # Ray announces at every start that token authentication is on; it stays on, quietly.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    options = {"logging_level": logging.WARNING, "log_to_driver": True,
               "runtime_env": {"worker_process_setup_hook":
                               "distbelief.distributed.quiet.quiet_worker"}}
    if address:
        check_reachable(address, connect_timeout_s)
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
    """Within: ray.init leaves the SIGTERM handler alone. It installs one that exits at once
    (`sys.exit(15)`: a silent status 15, Ray half started) as soon as it begins; the run's own
    handler (stop after this step and checkpoint, or before anything is written) must hold
    throughout, so Ray's installer is made a no-op while it runs, and the previous handler is
    put back afterwards in case another path installed one."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    utils = ray._private.utils
    install = getattr(utils, "set_sigterm_handler", None)
    if install is not None:
        utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if install is not None:
            utils.set_sigterm_handler = install
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool, connect_timeout_s: float = 10.0):
    """Within: connected to Ray (`start_ray`); on exit Ray is shut down if it started here."""
    started = start_ray(address, dashboard, connect_timeout_s)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def pickle_by_value(module) -> None:
    """Ship `module`'s functions and classes to the workers by value rather than by name
    (for a user's module that the workers cannot import)."""
    ray.cloudpickle.register_pickle_by_value(module)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise `DistbeliefError` in one line unless `address` ("host:port", or "auto": the
    cluster Ray's files or RAY_ADDRESS name) answers as a Ray cluster's GCS within `timeout_s`
    seconds. ray.init would instead retry for a minute on a closed port, and hang with
    warnings on a port where another program listens or on a stale cluster file. Ray Client
    addresses (ray://) are left to Ray."""
    if address.startswith("ray://"):
        return
    target = address
    if address == "auto":
        try:
            target = ray._private.services.canonicalize_bootstrap_address("auto")
        except Exception as e:  # noqa: BLE001 - Ray's own message, in one line
            raise DistbeliefError(f"--address auto finds no Ray cluster ({describe(e)[:160]}); "
                                  f"start one with 'ray start --head'") from None
        if target is None:
            raise DistbeliefError("--address auto finds no Ray cluster; start one with "
                                  "'ray start --head'")
    answer = _gcs_answer(target, timeout_s)
    if answer is not None:
        named = f"{address} ({target})" if target != address else address
        raise DistbeliefError(f"the Ray cluster at {named} does not answer: {answer}; start "
                              f"it with 'ray start --head' or drop --address")


def _gcs_answer(address: str, timeout_s: float) -> str | None:
    """None when a Ray GCS answers at `address` (one call of its cluster-id method: answered,
    or refused for want of the cluster's token, which only a GCS with token auth does);
    otherwise what went wrong."""
    import grpc  # Ray's own dependency

    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return "expected HOST:PORT"
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                               request_serializer=bytes, response_deserializer=bytes)
    try:
        call(b"", timeout=timeout_s)
        return None
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"nothing answered within {timeout_s:g} s (--connect-timeout-s)"
        details = e.details() or str(code)
        if code == grpc.StatusCode.UNIMPLEMENTED or "Failed parsing HTTP" in details:
            return "a program that is not Ray listens there"
        if code == grpc.StatusCode.UNAVAILABLE and "Failed to connect" in details:
            return "nothing listens there"
        return details.splitlines()[0][:120]
    finally:
        channel.close()
