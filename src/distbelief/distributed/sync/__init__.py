"""Synchronous data parallelism (`--mode sync`) on Ray Train: `SyncTrainer`.

- `worker`: one rank's training loop and the batch semantics (no Ray).
- `hub`: where the workers' events meet the driver (no Ray).
- `actors`: the hub's actor, rank 0's client, the function Ray Train's workers run.
- `driver`: `SyncTrainer`, the scheme the run lifecycle drives.
"""

__all__ = ["SyncTrainer"]


def __getattr__(name):
    # The driver imports Ray; keep `import distbelief.distributed.sync` free of it.
    if name == "SyncTrainer":
        from distbelief.distributed.sync.driver import SyncTrainer
        return SyncTrainer
    raise AttributeError(name)
