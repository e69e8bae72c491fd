"""Joining a cluster never hangs: an address is checked to answer as a Ray GCS within the
connect timeout, whatever listens there (nothing, a silent program, a program of another
protocol, a stale cluster file), and a real GCS passes."""

import socket
import threading
import time

import pytest

from distbelief.errors import DistbeliefError

pytest.importorskip("ray")
from distbelief.distributed.runtime.startup import check_reachable  # noqa: E402


@pytest.fixture
def listener():
    """A local port where a program accepts connections and does `answer` to each."""
    sockets = []

    def start(answer):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        sockets.append(server)

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                answer(conn)

        threading.Thread(target=serve, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    yield start
    for s in sockets:
        s.close()


def _http(conn):
    conn.recv(100)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    conn.close()


def test_a_silent_program_is_given_up_on_after_the_timeout(listener):
    address = listener(lambda conn: None)  # accepts and never answers
    began = time.monotonic()
    with pytest.raises(DistbeliefError, match=f"the Ray cluster at {address} does not answer: "
                                              f"nothing answered within 0.5 s"):
        check_reachable(address, timeout_s=0.5)
    assert time.monotonic() - began < 5


def test_a_program_of_another_protocol_is_named(listener):
    with pytest.raises(DistbeliefError, match="a program that is not Ray listens there"):
        check_reachable(listener(_http), timeout_s=5)


def test_a_closed_port_and_a_stale_cluster_file(monkeypatch):
    with pytest.raises(DistbeliefError, match="nothing listens there"):
        check_reachable("127.0.0.1:1")
    # "auto" follows RAY_ADDRESS (or the cluster file `ray start` wrote) to a dead cluster.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(DistbeliefError, match=r"at auto \([0-9.]+:1\) does not answer"):
        check_reachable("auto")


@pytest.mark.ray
def test_a_real_gcs_answers(ray_cluster):
    import ray

    check_reachable(ray.get_runtime_context().gcs_address, timeout_s=5)
