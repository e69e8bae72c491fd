"""DistBelief's distributed training schemes on Ray (Dean et al., 2012), one package each, over
shared pieces:

    downpour/        Downpour SGD: asynchronous replicas and a sharded parameter server
    sandblaster/     Sandblaster L-BFGS: a coordinator, batch portions, vectors on the shards
    sync/            synchronous data parallelism on Ray Train (the baseline)
    pipeline/        model parallelism: a replica's model cut into partitions
    flat.py          a model as the server's flat vector (no Ray)
    pending.py       the pending-call protocol between replicas and their clients (no Ray)
    placement.py     how big each actor is and where it goes (no Ray)
    server_model.py  the driver's model at the server's parameters: evaluation, last.pt (no Ray)
    runtime.py       Ray itself: start or join, place actors, wait for calls, failures

Each scheme's core (shards, replicas, queues) is plain Python tested without Ray; its
`actors.py` wraps it in thin Ray actors; its driver runs the shared `engine.lifecycle`.
`import ray` appears only in runtime.py and the actor modules.
"""

__all__ = ["DownpourTrainer", "SandblasterTrainer", "SyncTrainer"]


def __getattr__(name):
    # The drivers import Ray lazily; keep `import distbelief.distributed` free of it.
    if name == "DownpourTrainer":
        from distbelief.distributed.downpour.driver import DownpourTrainer
        return DownpourTrainer
    if name == "SandblasterTrainer":
        from distbelief.distributed.sandblaster.coordinator import SandblasterTrainer
        return SandblasterTrainer
    if name == "SyncTrainer":
        from distbelief.distributed.sync.driver import SyncTrainer
        return SyncTrainer
    raise AttributeError(name)
