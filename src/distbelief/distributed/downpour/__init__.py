"""Downpour SGD (Dean et al., 2012, Sec. 4.1): model replicas training asynchronously against a
sharded parameter server.

    shard.py        ParameterShard: a slice of the server vector and its update rule (no Ray)
    rules.py        how a shard applies a stale gradient (--staleness-rule; no Ray)
    replica.py      DownpourReplica: a replica's fetch / compute / push loop (no Ray)
    partitioned.py  a replica cut into partitions, each talking to its own shards (no Ray)
    layout.py       where each shard's slice lies in the server vector (no Ray)
    work.py         WorkQueue: which replica trains which of its steps next (no Ray)
    records.py      ChunkWindow, ShardMonitor, the summary: what the trainer records (no Ray)
    actors.py       the Ray actors around shards, replicas and partitions; the replicas' client
    statistics.py   BatchNorm running statistics pushed and folded (--bn-stats; no Ray)
    generation.py   a checkpoint generation as both drivers write and read it (no Ray)
    lockstep.py     LockstepTrainer: N replicas in turn in one process (--lockstep; no Ray)
    trainer.py      DownpourTrainer: hands out work, evaluates, logs, checkpoints, recovers

A Downpour step: replica r installs the parameters its last fetch brought (the shards' slices,
joined), computes a minibatch gradient on its own slice of the data, and every --n-push steps
sends the accumulated gradient to the shards, each its slice, without waiting; each shard
applies it on arrival (SGD or Adagrad) and counts how stale it was. Every --n-fetch steps the
replica asks for fresh parameters; a push followed by a fetch travels as one call per shard.
"""

from distbelief.distributed.downpour.replica import DownpourReplica, LocalClient, initial_vector
from distbelief.distributed.downpour.shard import ParameterShard
from distbelief.distributed.downpour.work import WorkQueue

__all__ = ["DownpourReplica", "LocalClient", "ParameterShard", "WorkQueue", "initial_vector",
           "DownpourTrainer"]


def __getattr__(name):
    # The trainer imports Ray; keep importing the Ray-free core free of it.
    if name == "DownpourTrainer":
        from distbelief.distributed.downpour.trainer import DownpourTrainer
        return DownpourTrainer
    raise AttributeError(name)
