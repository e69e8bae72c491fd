"""Downpour test helpers: a small digits config and in-process shards."""

from distbelief.distributed.downpour import ParameterShard
from distbelief.distributed.pending import Done
from distbelief.distributed.downpour.layout import plain_layout
from distbelief.distributed.downpour.statistics import buffer_slice
from distbelief.engine.config import TrainConfig
from distbelief.optim import shard_bounds


def digits_config(**kw):
    settings = dict(recipe="test", model="resnet20", data="digits", batch_size=32, iterations=40,
                    lr=0.05, milestones=(12,), pad=1, flip=False, deterministic=True,
                    device="cpu", mode="downpour", overlap=False)
    return TrainConfig().replace(**{**settings, **kw})


def make_shards(config, data, count):
    """`count` in-process shards over the initial server vector (the trainer's layout)."""
    w0, slots, retention = plain_layout(config, data)
    n_params = slots[0].param_end
    return [ParameterShard(k, lo, hi, n_params, w0[lo:hi], config,
                           retention=buffer_slice(retention, lo, hi, n_params))
            for k, (lo, hi) in enumerate(shard_bounds(w0.numel(), count))], n_params


class TableClient:
    """`StalenessBound`'s client over an in-process `ReplicaClocks`: reports answer at once, and a
    wait that would block is an error (one thread: nobody could end it). Counts calls."""

    def __init__(self, clocks):
        self.clocks, self.reports, self.waits = clocks, [], []

    def report(self, replica, position):
        self.reports.append((replica, position))
        return Done(self.clocks.report(replica, position))

    def wait(self, replica, position):
        self.waits.append((replica, position))
        self.clocks.report(replica, position)
        assert self.clocks.allowed(replica, position), "this wait would never end"
        return Done(self.clocks.level(replica))
