"""The driver's side of a partitioned replica in single mode (`--partitions P`): it starts one
`StageActor` per part of the model on Ray, runs the pipeline schedule step by step, and brings
the parts' parameters and optimizer states home when the trainer evaluates or checkpoints.

The trainer keeps its whole-model optimizer and checkpoint format: a partitioned run's
checkpoint is an ordinary single-process checkpoint (`distbelief eval` reads it; --resume may
use another --partitions or none). A partition actor that dies loses its part's training
since the last checkpoint, so the run stops with one line naming it; --resume continues from
the last checkpoint.
"""

from __future__ import annotations

import time

import torch

from distbelief.distributed.pipeline.actors import StageActor, caller
from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.schedule import Pipeline
from distbelief.distributed.pipeline.stage import optimizer_join, optimizer_slice
from distbelief.distributed.runtime.calls import get_unless_dead
from distbelief.distributed.runtime.cluster import replica_options, wait_started
from distbelief.distributed.runtime.session import DriverSession
from distbelief.engine.config import TrainConfig


class PipelineRunner:
    """`model` cut into `config.cluster.partitions` parts (`partition.partition`, measured on
    `sample`, one example), trained by stage actors with `config.cluster.micro_batches`
    micro-batches per step. `start(optimizer, build_optimizer)` places the actors with the
    model's current weights and `optimizer`'s state (each part's optimizer made by
    `build_optimizer(config, module)`); `close()` releases them."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, sample: torch.Tensor,
                 address: str | None = None, dashboard: bool = False):
        self.config = config
        self.plan = partition(model, config.cluster.partitions, sample)
        self.session = DriverSession(address, dashboard, config.cluster.connect_timeout_s)
        self.pipeline: Pipeline | None = None
        self.step_s, self.steps = 0.0, 0  # wall time of the steps since the last `metrics`

    @property
    def parts(self):
        return self.plan.parts

    def start(self, optimizer: torch.optim.Optimizer, build_optimizer) -> list[dict]:
        """Place one actor per part (each with its weights and its slice of `optimizer`'s
        state); returns the actors' `info()` once all answer."""
        c, count = self.config, len(self.parts)
        self.session.start()
        options, shape = replica_options(c, count=count)
        options["max_restarts"] = 0  # a restarted partition would have lost its weights
        full = optimizer.state_dict()
        self.session.replicas = [StageActor.options(**options).remote(
            part.index, count, part.module, c, shape.threads, shape.device, build_optimizer,
            optimizer_slice(full, part.offset, part.n_tensors)) for part in self.parts]
        info = wait_started(self.session.replicas, shape)
        self.pipeline = Pipeline(caller(self.session.replicas), self._get, count,
                                 c.cluster.micro_batches, c.cluster.pipeline_schedule)
        return info

    def _get(self, refs):
        return get_unless_dead(refs, self.session.replicas, lambda dead: (
            f"partition actor(s) {', '.join(map(str, dead)) or '?'} died; their weights since "
            f"the last checkpoint are lost: --resume continues from it"))

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, int]:
        """One training step (`Pipeline.step`)."""
        start = time.perf_counter()
        out = self.pipeline.step(x, y, lr)
        self.step_s += time.perf_counter() - start
        self.steps += 1
        return out

    def gather(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the parts' current weights into the driver's model (the parts share its
        modules) and their optimizer states into `optimizer`."""
        states = self._get([a.state.remote() for a in self.session.replicas])
        with torch.no_grad():
            for part, state in zip(self.parts, states):
                part.module.load_state_dict(state["module"])
        optimizer.load_state_dict(optimizer_join(
            [s["optimizer"] for s in states], [p.offset for p in self.parts],
            optimizer.state_dict()))

    def metrics(self) -> dict:
        """Per partition since the last call: compute seconds, seconds idle or moving data
        (the step's wall time minus compute), bytes handed on per step, the peak bytes of
        activations held for backward; and the bubble: the
        fraction of the partitions' time spent not computing."""
        times = self._get([a.take_times.remote() for a in self.session.replicas])
        wall, steps = self.step_s, max(self.steps, 1)
        self.step_s, self.steps = 0.0, 0
        compute = [t["compute_s"] for t in times]
        c = self.config.cluster
        return {"partitions": len(times), "micro_batches": c.micro_batches,
                "schedule": c.pipeline_schedule, "recompute": c.recompute,
                "compute_s": [round(s, 4) for s in compute],
                "idle_s": [round(max(wall - s, 0.0), 4) for s in compute],
                "bytes_per_step": [t["bytes_out"] // steps for t in times],
                "peak_activation_bytes": [t["peak_activation_bytes"] for t in times],
                "bubble": round(1 - sum(compute) / max(wall * len(times), 1e-9), 4)}

    def close(self) -> None:
        self.session.close()
