"""DistBelief's distributed training schemes on Ray (Dean et al., 2012).

    shard.py     ParameterShard: a slice of the server vector and its update rule (no Ray)
    downpour.py  DownpourReplica: a model replica's fetch / compute / push loop (no Ray)
    actors.py    the Ray actors wrapping them, the replicas' Ray client, starting Ray
    job.py       RayJob: what both drivers share (Ray's lifetime, waiting, evaluation, records)
    driver.py    DownpourTrainer: runs a Downpour job on a Ray cluster (local by default)
    sandblaster.py  Sandblaster's shard vectors, portion queue and replica (no Ray)
    coordinator.py  SandblasterTrainer: the L-BFGS coordinator driving shards and replicas
"""

from distbelief.distributed.shard import ParameterShard

__all__ = ["ParameterShard", "DownpourTrainer", "SandblasterTrainer"]


def __getattr__(name):
    # The driver imports Ray lazily; keep `import distbelief.distributed` free of it.
    if name == "DownpourTrainer":
        from distbelief.distributed.driver import DownpourTrainer
        return DownpourTrainer
    if name == "SandblasterTrainer":
        from distbelief.distributed.coordinator import SandblasterTrainer
        return SandblasterTrainer
    raise AttributeError(name)
