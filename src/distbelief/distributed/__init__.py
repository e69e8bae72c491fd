"""DistBelief's distributed training schemes on Ray (Dean et al., 2012), one package each, over
shared pieces:

    pipeline/        model parallelism: a model cut into partitions (single mode: --partitions)
    downpour/        Downpour SGD: asynchronous replicas and a sharded parameter server, the
                     replicas whole or cut into partitions (built on pipeline/)
    sandblaster/     Sandblaster L-BFGS: a coordinator, batch portions, vectors on the shards
    sync/            synchronous data parallelism on Ray Train (the baseline)
    runtime/         Ray itself: start or join, place actors, calls and failures, snapshots
    flat.py          a model as the server's flat vector (no Ray)
    pending.py       the pending-call protocol between replicas and their clients (no Ray)
    placement.py     how big each actor is and where it goes (no Ray)
    keeper.py        the snapshot keeper's core (no Ray)
    server_model.py  the driver's model at the server's parameters: evaluation, last.pt (no Ray)
    wire.py          how vectors travel: dtypes, views (no Ray)

Each scheme's core (shards, replicas, queues) is plain Python tested without Ray; its
`actors.py` wraps it in thin Ray actors; its `trainer.py` runs the shared `engine.lifecycle`.
`import ray` appears only in runtime/ and the actor modules. The layering, checked by
tests/distributed/test_layering.py: nothing under engine/ imports from distributed/, and
downpour/ builds on pipeline/, never the other way round.
"""

__all__ = ["DownpourTrainer", "PipelineTrainer", "SandblasterTrainer", "SyncTrainer"]


def __getattr__(name):
    # The drivers import Ray lazily; keep `import distbelief.distributed` free of it.
    if name == "DownpourTrainer":
        from distbelief.distributed.downpour.trainer import DownpourTrainer
        return DownpourTrainer
    if name == "SandblasterTrainer":
        from distbelief.distributed.sandblaster.trainer import SandblasterTrainer
        return SandblasterTrainer
    if name == "PipelineTrainer":
        from distbelief.distributed.pipeline.trainer import PipelineTrainer
        return PipelineTrainer
    if name == "SyncTrainer":
        from distbelief.distributed.sync.trainer import SyncTrainer
        return SyncTrainer
    raise AttributeError(name)
