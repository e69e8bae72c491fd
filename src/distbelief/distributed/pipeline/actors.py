"""The partition actor: a thin Ray wrapper around `Stage`, where the logic lives and is tested
without Ray. Activations and gradients cross between actors as numpy arrays, which Ray moves
through its shared-memory object store without pickling their bytes; an argument that is
another actor's result (an object reference) is fetched by Ray itself from the node that holds
it (results under 100 KiB travel inline, through the caller)."""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from distbelief.distributed.downpour.actors import RayClient
from distbelief.distributed.downpour.shard import shard_lost
from distbelief.distributed.pipeline.replica import PartitionedReplica, ServerStage
from distbelief.distributed.pipeline.stage import Stage
from distbelief.distributed.runtime import (START_TIMEOUT_S, dead_actors, memory, node_id,
                                            nodes)
from distbelief.distributed.wire import tensor_view, wire_dtype
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import set_determinism
from distbelief.errors import DistbeliefError


class PartitionLost(DistbeliefError):
    """A partition actor of a replica died during a call; Ray restarts it (its values come
    back from the server), and the replica's step is retried."""

    replica_failure = True  # runtime.ReplicaCalls counts it as the replica's death


def caller(actors: list):
    """`call(p, method, *args)` for the pipeline schedule: submit to actor p, tensors sent as
    numpy arrays (object references pass as they are)."""
    def call(p: int, method: str, *args):
        args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
        return getattr(actors[p], method).remote(*args)
    return call


def _tensor(value):
    return tensor_view(value) if isinstance(value, np.ndarray) else value


def _array(value):
    if value is None:
        return None
    return value.detach().float().cpu().numpy() if value.dtype == torch.bfloat16 else \
        value.detach().cpu().numpy()


@ray.remote
class StageActor:
    """Partition `index` of `count` in its own process: its module (only its own part of the
    model), its optimizer (`optimizer` builds one over the module's parameters; its state
    `optimizer_state` in the part's numbering), `threads` CPU threads on `device`."""

    def __init__(self, index: int, count: int, module, config, threads: int, device: str,
                 optimizer=None, optimizer_state: dict | None = None, server=None):
        torch.set_num_threads(threads)
        device = torch.device(device)
        set_determinism(config.deterministic, device)
        if server is not None:  # Downpour: (its shards' names, their bounds in its block, r)
            names, bounds, replica = server
            client = RayClient([ray.get_actor(n) for n in names], bounds, wire_dtype(config),
                               one_put=len(nodes()) == 1)
            self.stage = ServerStage(index, count, module, get_loss(config.loss), config,
                                     client, replica, device)
            return
        module = module.to(device)
        has_params = any(True for _ in module.parameters())
        opt = optimizer(config, module) if optimizer is not None and has_params else None
        self.stage = Stage(index, count, module, get_loss(config.loss), opt, device=device,
                           channels_last=config.channels_last, bf16=config.bf16)
        if optimizer_state is not None and opt is not None:
            opt.load_state_dict(optimizer_state)

    def zero_grad(self) -> None:
        self.stage.zero_grad()

    def forward(self, micro: int, x, train: bool = True):
        return _array(self.stage.forward(micro, _tensor(x), train))

    def forward_loss(self, micro: int, x, y, weight: float):
        return self.stage.forward_loss(micro, _tensor(x), _tensor(y), weight)

    def backward(self, micro: int, grad=None):
        return _array(self.stage.backward(micro, None if grad is None else _tensor(grad)))

    def update(self, lr: float) -> None:
        self.stage.update(lr)

    def take_times(self) -> dict:
        return self.stage.take_times()

    def begin(self, step: int) -> None:
        self.stage.begin(step)

    def finish(self, step: int, error: float) -> None:
        self.stage.finish(step, error)

    def take_metrics(self) -> dict:
        return self.stage.take_metrics()

    def drain(self) -> dict:
        return self.stage.drain()

    def reset(self) -> None:
        self.stage.reset()

    def state(self) -> dict:
        return self.stage.state()

    def info(self) -> dict:
        params = sum(p.numel() for p in self.stage.module.parameters())
        return {"partition": self.stage.index, "node": node_id(), "params": params,
                "device": str(self.stage.device), "threads": torch.get_num_threads(),
                "memory": memory()}


@ray.remote(num_cpus=0)
class PartitionedReplicaActor:
    """A Downpour replica's head (`PartitionedReplica`): its data slice and the schedule; its
    partitions are `StageActor`s found by name (handles among constructor arguments would pin
    them, which Ray warns makes restarts fragile)."""

    def __init__(self, index: int, config, stage_names: list[str], stats: dict):
        self.config = config
        self.stages = [ray.get_actor(name) for name in stage_names]
        self.replica = PartitionedReplica(index, config, caller(self.stages), self._get,
                                          len(self.stages), stats=stats)

    def _get(self, refs):
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            error = e
        if dead_actors(self.stages):  # a partition is dead or restarting
            raise PartitionLost(f"a partition of replica {self.replica.index} died; Ray "
                                f"restarts it and its steps are handed out again")
        cause = error.cause if isinstance(error, RayTaskError) else error
        if isinstance(cause, DistbeliefError):
            raise cause
        if isinstance(cause, RayActorError):  # the partitions live: a shard is gone for good
            raise DistbeliefError(shard_lost(self.config))
        raise error

    def run(self, start: int, steps: int) -> dict:
        return self.replica.run(start, steps)

    def drain(self) -> dict:
        return self.replica.drain()

    def info(self) -> dict:
        """Once every partition answers (waiting while Ray restarts one), and what a failed
        chunk left on them is dropped: the driver's ping before it hands out work again."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                parts = ray.get([s.info.remote() for s in self.stages])
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.replica.recover()  # what a failed chunk left on the partitions goes
        return {"replica": self.replica.index, "node": node_id(), "partitions": parts}
