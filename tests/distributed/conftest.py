import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray per test module (Ray's advice: starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    from distbelief.distributed.runtime import start_ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    start_ray()  # no-op here: the driver must reuse this cluster, not start its own
    yield ray
    ray.shutdown()
