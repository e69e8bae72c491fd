"""`runtime.calls.dead_actors` on the shared local Ray: one ping to every actor at once; an
actor that is gone counts as dead, one that is busy past the timeout as alive."""

import sys
import time

import pytest

pytestmark = pytest.mark.usefixtures("ray_cluster")


class Pinged:
    def info(self, seconds: float = 0.0) -> dict:
        time.sleep(seconds)
        return {}

    def busy(self, seconds: float) -> None:
        time.sleep(seconds)


def test_dead_actors_are_named_and_busy_ones_are_not():
    import ray

    from distbelief.distributed.runtime.calls import dead_actors

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(num_cpus=0)(Pinged)
    alive, busy, gone = (actor.remote() for _ in range(3))
    ray.get([a.info.remote() for a in (alive, busy, gone)])
    busy.busy.remote(5.0)  # its ping waits behind this call
    ray.kill(gone, no_restart=True)
    started = time.monotonic()
    assert dead_actors([alive, busy, gone], timeout_s=1.0) == [2]
    assert time.monotonic() - started < 4.0  # one wait for all of them, not one per actor
