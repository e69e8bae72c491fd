"""Synchronous data parallelism (`--mode sync`) on Ray Train: `SyncTrainer`.

- `worker`: one rank's training loop and the batch semantics (no Ray).
- `hub`: where the workers' events meet the driver (no Ray).
- `actors`: the hub's actor, rank 0's client, the function Ray Train's workers run.
- `trainer`: `SyncTrainer`, what the run lifecycle drives.
"""

__all__ = ["SyncTrainer"]


def __getattr__(name):
    # The trainer imports Ray; keep `import distbelief.distributed.sync` free of it.
    if name == "SyncTrainer":
        from distbelief.distributed.sync.trainer import SyncTrainer
        return SyncTrainer
    raise AttributeError(name)
