"""The driver's side of a partitioned replica in single mode (`--partitions P`): it starts one
`StageActor` per part of the model on Ray (each drawing its initial values by name, or loading
them), runs the pipeline schedule step by step, runs evaluations through the parts (`infer`),
and has each part write its piece of a checkpoint (`write_parts`) and read it back by name
(`read_parts`, whatever the cut it was written with). `gather` brings the parts' parameters
and optimizer states home instead, for a trainer that keeps a whole copy (a model given to
`distbelief.fit`, --bn-recalibrate).

A partition actor that dies is restarted in place by Ray (up to --max-restarts times each),
and every partition goes back to the newest snapshot, taken at the start and then every
--snapshot-every-s seconds: each partition's weights and optimizer state, left in Ray's
object store as the result of a call, owned by this process and never fetched by it (so no
process holds more than its part, and Ray may spill them to disk). All go back, not only the
restarted one, so that the parts stay one model; the steps since the snapshot are lost
(`partition_steps_lost`), and the step that failed runs again. A partition that died more
than --max-restarts times, is gone for good, or whose snapshot was lost with its node stops
the run with one line (as does any death under --snapshot-every-s 0); --resume continues from
the last checkpoint.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch

from distbelief.distributed.pipeline.actors import (PartitionGone, StageActor, answer, caller,
                                                   load_snapshot, received, send_states,
                                                   take_snapshot, watcher)
from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.schedule import Pipeline
from distbelief.distributed.pipeline.stage import empty_copy, optimizer_join, optimizer_slice
from distbelief.distributed.runtime.calls import ActorsLost, get_unless_dead
from distbelief.distributed.runtime.cluster import replica_options, wait_started
from distbelief.distributed.runtime.session import DriverSession
from distbelief.engine.config import TrainConfig
from distbelief.engine.pieces import MARKER, fingerprint, from_pieces, read_piece, write_part
from distbelief.engine.trainer import build_optimizer


class PipelineRunner:
    """`model` cut into `config.cluster.partitions` parts (`partition.partition`, measured on
    `sample`, one example), trained by stage actors with `config.cluster.micro_batches`
    micro-batches per step. `start` places the actors (each part's optimizer made by
    `build_optimizer(config, module)`); `close()` releases them. `model` may be on the meta
    device (the parts then get their values from `start`)."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, sample: torch.Tensor,
                 address: str | None = None, dashboard: bool = False):
        self.config = config
        self.plan = partition(model, config.cluster.partitions, sample,
                              config.cluster.partition_at)
        self.session = DriverSession(address, dashboard, config.cluster.connect_timeout_s)
        self.pipeline: Pipeline | None = None
        self.step_s, self.steps = 0.0, 0  # wall time of the steps since the last `metrics`
        # (step, each partition's state as a Ray result): the newest, and the one before it
        self.snapshots: tuple | None = None
        self.previous: tuple | None = None
        self.snapshot_at = time.monotonic()
        self.restarts = [0] * len(self.plan.parts)
        self.failures: list[dict] = []  # restarts since the trainer last took them

    @property
    def parts(self):
        return self.plan.parts

    def start(self, step: int = 0, *, states: list[dict] | None = None,
              init: tuple | None = None, files: list[Path] | None = None) -> list[dict]:
        """Place one actor per part at the run's step `step` (its first snapshot's), each
        with its values and optimizer state from one of: `states` (each part's, `states_of`),
        `init` (the model's (seed, rule): each part draws its values by name, as the whole
        model would) or `files` (a checkpoint's pieces: `read_parts`). Returns the actors'
        `info()` once all answer."""
        c, count = self.config, len(self.parts)
        self.session.start()
        options, shape = replica_options(c, count=count)
        options["max_restarts"] = c.cluster.max_restarts  # then loaded from its snapshot
        # The parts travel empty (on the meta device: a few bytes, which Ray keeps for a
        # restart) and their values after them, through the object store.
        self.session.replicas = [StageActor.options(**options).remote(
            part.index, count, empty_copy(part.module), c, shape.threads, shape.device,
            build_optimizer, None if init is None else (part.names, *init))
            for part in self.parts]
        info = wait_started(self.session.replicas, shape)
        self.incarnations = [i["incarnation"] for i in info]
        if states is not None:
            send_states(self.session.replicas, states)
        elif files is not None:
            self.read_parts(files)
        self._join()
        self._snapshot_if_due(step, force=True)  # the values they start from
        self.pipeline = Pipeline(caller(self.session.replicas), self._get, count,
                                 c.cluster.micro_batches, c.cluster.pipeline_schedule,
                                 c.cluster.pipeline_ahead, c.cluster.pipeline_handoff,
                                 watcher(self.session.replicas))
        return info

    def _join(self) -> None:
        """Under collective hand-offs, every partition in a new collective group (at the
        start, and after a failed step: a group is not used again once a step failed)."""
        if self.config.cluster.pipeline_handoff != "collective":
            return
        actors, group = self.session.replicas, f"distbelief-pipeline-{uuid.uuid4().hex}"
        self._get([a.join.remote(len(actors), group) for a in actors])

    def _get(self, refs):
        return get_unless_dead(refs, self.session.replicas, lambda dead: (
            f"partition actor(s) {', '.join(map(str, dead)) or '?'} died; their weights since "
            f"the last checkpoint are lost: --resume continues from it"))

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, iteration: int = 0
             ) -> tuple[float, int]:
        """One training step (`Pipeline.step`) as step `iteration` of the run; a partition
        that dies is restarted from its snapshot and the step run again (module doc)."""
        start = time.perf_counter()
        while True:
            try:
                out = self.pipeline.step(x, y, lr)
                break
            except ActorsLost as lost:
                self._restart(lost, iteration)
        self.step_s += time.perf_counter() - start
        self.steps += 1
        self._snapshot_if_due(iteration + 1)
        return out

    def _snapshot_if_due(self, step: int, force: bool = False) -> None:
        """Each partition's state as of `step` steps, when --snapshot-every-s says so: results
        left where the partitions are (this process holds only their refs, and waits until
        they exist without fetching them). The one before is kept too: a snapshot taken
        from a partition that died while taking it is an error, and `_restore` falls back."""
        every = self.config.downpour.snapshot_every_s
        if not every or (time.monotonic() - self.snapshot_at < every and not force):
            return
        refs = take_snapshot(self.session.replicas)
        self.previous = self.snapshots
        self.snapshots = (step, refs)
        self.snapshot_at = time.monotonic()

    def _restore(self, lost: ActorsLost) -> int:
        """Every partition loaded with the newest snapshot that holds values for all of them;
        the step it is from."""
        for snapshot in (self.snapshots, self.previous):
            if snapshot is None:
                continue
            step, refs = snapshot
            try:
                if load_snapshot(self.session.replicas, refs):
                    return step
            except PartitionGone:
                raise lost from None
        raise lost  # --snapshot-every-s 0: no snapshots

    def _restart(self, lost: ActorsLost, iteration: int) -> None:
        """After partitions died: those Ray restarted, and then every partition, go back to
        the newest snapshot (the same step for all, so that the model stays one model: a
        partition may have updated in the step that failed); raises `lost` when a dead one
        may not be restarted (no restarts left, or gone for good) or the snapshot is lost."""
        # Ray may have restarted one already: its incarnation tells.
        try:
            answers = [answer(a) for a in self.session.replicas]
            dead = [p for p, info in enumerate(answers)
                    if info is None or info["incarnation"] != self.incarnations[p]]
            if not dead or any(self.restarts[p] >= self.config.cluster.max_restarts
                               for p in dead):
                raise lost
            for p in dead:
                self.restarts[p] += 1
                info = answers[p] or answer(self.session.replicas[p], wait=True)
                self.incarnations[p] = info["incarnation"]
        except PartitionGone:
            raise lost from None
        restored = self._restore(lost)
        self._join()
        self.failures += [{"kind": "failure", "actor": f"partition {p}", "iteration": iteration,
                           "restarted": True, "restored_step": restored,
                           "steps_lost": iteration - restored} for p in dead]

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for `x` in eval mode (float32), computed by the partitions
        (`Pipeline.infer`): what an evaluation needs, without their weights moving."""
        return torch.cat([received(o).float() for o in self.pipeline.infer(x)])

    def states_of(self, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Each part's `Stage.state()` from the whole model (whose modules the parts share)
        and its `optimizer`."""
        full = optimizer.state_dict()
        return [{"module": part.module.state_dict(),
                 "optimizer": optimizer_slice(full, part.offset, part.n_tensors)}
                for part in self.parts]

    def read_parts(self, files: list[Path]) -> None:
        """Each partition loaded by name from a checkpoint's pieces (`files`, of any cut):
        read by the partition itself where it sees them, else here and sent (one part at a
        time)."""
        seen = [(str(f), fingerprint(f)) for f in files]
        actors = self.session.replicas
        read = self._get([a.read_part.remote(part.names, seen)
                          for a, part in zip(actors, self.parts)])
        unseen = [p for p, ok in enumerate(read) if not ok]
        pieces = [read_piece(f) for f in files] if unseen else []
        for p in unseen:
            send_states([actors[p]], [from_pieces(pieces, self.parts[p].module,
                                                  self.parts[p].names)])

    def write_parts(self, folder: Path, seen: tuple[int, int]) -> tuple[list[Path], bool]:
        """Each partition's piece written into the generation `folder` (`seen`: the
        fingerprint of its marker) by the partition itself, or through here where it does not
        see the folder; returns (the files, whether every part's values are finite)."""
        files = [folder / f"part-{p}.pt" for p in range(len(self.parts))]
        actors = self.session.replicas
        written = self._get([a.write_part.remote(part.names, str(f), str(folder / MARKER), seen)
                             for a, part, f in zip(actors, self.parts, files)])
        for p, reply in enumerate(written):
            if reply is None:
                part = self.parts[p]
                written[p] = write_part(self._get(actors[p].state.remote()), part.module,
                                        part.names, files[p])
        return files, all(w["finite"] for w in written)

    def finite(self) -> bool:
        """Whether every part's parameters are finite."""
        return all(self._get([a.finite.remote() for a in self.session.replicas]))

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
                "schedule": self.pipeline.schedule, "ahead": self.pipeline.ahead,
                "handoff": self.pipeline.handoff,
                "recompute": c.recompute,
                "compute_s": [round(s, 4) for s in compute],
                "idle_s": [round(max(wall - s, 0.0), 4) for s in compute],
                "bytes_per_step": [t["bytes_out"] // steps for t in times],
                "peak_activation_bytes": [t["peak_activation_bytes"] for t in times],
                "bubble": round(1 - sum(compute) / max(wall * len(times), 1e-9), 4)}

    def close(self) -> None:
        self.session.close()
