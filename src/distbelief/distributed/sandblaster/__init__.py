"""Sandblaster L-BFGS (Dean et al., 2012, Sec. 4.2).

    shard.py        VectorShard: slices of every L-BFGS vector, the round's accumulator (no Ray)
    portions.py     batches and portions, PortionQueue, Verdicts (no Ray)
    replica.py      SandblasterReplica: portions' gradients, pushes of winners only (no Ray)
    objective.py    LocalBatchObjective: the batch objective in one process, the reference
    actors.py       the Ray actors, the coordinator's store over them, the replicas' client
    gradient.py     BatchGradient: one round on the replicas, from the coordinator's side
    trainer.py      SandblasterTrainer (the paper's coordinator): L-BFGS on the shards,
                    checkpoints, records

The coordinator (the driver) runs `optim.lbfgs.LBFGS` over a store whose vectors live on the
parameter-server shards, each shard holding its slice of every vector (`VectorShard`); it never
holds a parameter vector. Each objective evaluation is one *round*:

1. the coordinator tells the shards the round number; they zero their gradient accumulator;
2. the batch is cut into many portions (`--portions`, far more than replicas); a replica gets
   one portion at a time (`PortionQueue`), so fast replicas do more. At its first portion of
   the round a replica fetches the parameters "x"; it reports each portion's loss to the
   coordinator and keeps its gradient until the coordinator's verdict (below), and it pushes
   the sum of its winning portions' gradients to the shards every `push_every` portions;
3. backup tasks: when no portion is left to hand out, idle replicas get copies of portions still
   running elsewhere; the first result reported wins and the others are discarded;
4. at the end the coordinator has every replica push what it holds (`flush`), checks that every
   shard holds every portion, and finishes the gradient on the shards:
   g = acc / batch + weight_decay * x.

Exactly once. The coordinator decides which copy of a portion wins when its result arrives, and
sends the verdict with its next call to that replica; only winners enter a replica's
accumulator. Each push names its portions; a shard adds a push only if it holds none of them
(`VectorShard.push`), so nothing is added twice even when a dead replica's push arrives late.
When a replica dies, the portions it won but had not pushed are found missing on the shards at
the end of the round and computed again, each pushed on its own ("solo"), so that a shard that
had received it already just skips it.
"""

from distbelief.distributed.sandblaster.objective import LocalBatchObjective
from distbelief.distributed.sandblaster.portions import PortionQueue
from distbelief.distributed.sandblaster.shard import LocalShards, VectorShard

__all__ = ["LocalBatchObjective", "LocalShards", "PortionQueue", "VectorShard",
           "SandblasterTrainer"]


def __getattr__(name):
    # The trainer imports Ray; keep importing the Ray-free core free of it.
    if name == "SandblasterTrainer":
        from distbelief.distributed.sandblaster.trainer import SandblasterTrainer
        return SandblasterTrainer
    raise AttributeError(name)
