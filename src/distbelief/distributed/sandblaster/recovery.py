"""A lost vector shard, rebuilt: the coordinator's side. Sandblaster's shards hold slices of
every L-BFGS vector, so losing one loses part of x, g and the history. At the start of every
iteration each shard sends the vectors written since the last one to the keeper on the driver's
node (`VectorShardActor.keep`) and the coordinator copies its scalars (`mark`). When a shard is
lost mid-iteration, Ray restarts it (on another node if its node is gone) from the keeper's
vectors, every other shard goes back to the same ones, the coordinator to its scalars, and the
iteration is repeated (`rebuild`): the updates of that one iteration are lost, nothing else.
"""

from __future__ import annotations

import time

from distbelief.distributed.runtime.calls import ShardLost
from distbelief.errors import DistbeliefError

RESTART_TIMEOUT_S = 120.0  # how long Ray may take to restart a lost shard
GRACE_S = 5.0  # how long a shard that reads as dead for good is given to read as restarting


class IterationStart:
    """What the coordinator needs to repeat the current iteration."""

    def __init__(self, store, life):
        self.store, self.life = store, life
        self.iteration, self.scalars = None, None

    def mark(self, iteration: int, optimizer, objective) -> None:
        """The start of `iteration`: every shard's vectors reach the keeper (this returns once
        they have), and the coordinator's scalars are copied."""
        self.store.call("keep", iteration)
        self.iteration = iteration
        self.scalars = (optimizer.state_dict(), objective.batch, objective.examples)

    def rebuild(self, lost: ShardLost, optimizer, objective) -> None:
        """Back to the start of the marked iteration, on every shard and in the coordinator.

        Raises:
            ShardLost: a shard is gone for good (its restarts are used up), or did not come
                back within RESTART_TIMEOUT_S."""
        iterations = self._rollback(lost)
        if iterations != [self.iteration] * len(iterations):
            raise DistbeliefError(f"the keeper holds the vectors of iterations {iterations}, "
                                  f"not {self.iteration}; --resume continues from the last "
                                  f"checkpoint")
        lbfgs, objective.batch, objective.examples = self.scalars
        optimizer.load_state_dict(lbfgs)
        counters = self.life.counters
        counters["shard_failures"] += 1
        counters["iterations_repeated"] += 1
        self.life.log({"kind": "failure", "actor": "shard", "iteration": self.iteration,
                       "wall_s": round(self.life.wall_s, 3), "repeated": True})
        self.life.say(f"a parameter-server shard was lost; it was rebuilt from the vectors of "
                      f"iteration {self.iteration}, which is repeated")

    def _rollback(self, lost: ShardLost) -> list:
        start = time.monotonic()
        while True:
            try:
                return self.store.call("rollback")
            except ShardLost as again:
                # Calls to a shard Ray is restarting fail at once until it answers; one that
                # is gone for good fails otherwise (after a moment: its death takes time to
                # reach every caller).
                waited = time.monotonic() - start
                if waited > RESTART_TIMEOUT_S or (not again.restarting and waited > GRACE_S):
                    raise lost from None
                time.sleep(0.2)
