"""Single-mode model parallelism (`--partitions P`): `PipelineTrainer(config, run_dir).fit()`.

The single-process trainer's loop, run directory and checkpoints, with each step computed by
P partition actors on Ray (`runner.PipelineRunner`) instead of in this process. Evaluations
run through the partitions too (`PartitionedModel`: the driver sends images and gets logits).

No process holds the whole model (a registry model trained into a run directory,
`piecewise`): this process builds it on
the meta device only, to cut it; each partition draws its own initial values by name
(`models.init`: the values the whole model has for the run's seed) and keeps its optimizer
state. A checkpoint is a generation of pieces, one per partition, written by the partition
(`pieces.write_part`), with last.pt saying where they are: `distbelief eval`, `export` and
`load` assemble the model from them, tensor by tensor; --resume reads each part's tensors by
name, with this cut, another or none. --init-from's weights are loaded here and handed to
the parts once, at the start.

A model given to `distbelief.fit`, --bn-recalibrate (which re-estimates the statistics on a
model of its own) and a run without a run directory keep a whole copy here: the parts'
weights and optimizer states come home (`gather`) when they are read, once per iteration at
most, and the checkpoint is an ordinary single-process one.
"""

from __future__ import annotations

import os

import torch

from distbelief.distributed.pipeline.runner import PipelineRunner
from distbelief.engine.checkpoint import PIECES
from distbelief.engine.config import TrainConfig
from distbelief.engine.lifecycle import Diverged
from distbelief.engine.pieces import MARKER, assemble, begin_pieces, pieces_folder
from distbelief.engine.setup import build_model
from distbelief.engine.trainer import STATE, Trainer
from distbelief.errors import ConfigError


class PipelineTrainer(Trainer):
    """`Trainer` over a model cut into `config.cluster.partitions` parts, each a Ray actor,
    with `config.cluster.micro_batches` micro-batches per step. `address` joins a Ray cluster
    (default: a local Ray, stopped at the end); `dashboard` starts the local one with its
    dashboard.

    Raises:
        ConfigError, DataError, CheckpointError: as `Trainer`, before anything is written.
        Diverged: as `Trainer`.
        DistbeliefError: a partition actor died and could not be restarted in place (more
            than --max-restarts times, or gone for good: --resume continues from the last
            checkpoint).
    """

    assembles = False  # each part reads its own tensors from a checkpoint's pieces

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        super().__init__(config, run_dir, resume=resume, progress=progress)
        sample = next(self.data.train.batches(0))[0][:1]  # one example, to cut by cost
        self.runner = PipelineRunner(self.config, self.model, sample.to(self._model_device),
                                     address, dashboard)
        self.placed: list[dict] = []
        self._gathered_at: int | None = None

    @staticmethod
    def check(config: TrainConfig) -> None:
        if config.cluster.partitions < 2:
            raise ConfigError("a pipeline needs --partitions 2 or more")

    @staticmethod
    def device_for(config: TrainConfig) -> str:
        # The driver's model is only evaluated and checkpointed, on the CPU; the partition
        # actors get their devices from Ray.
        return "cpu"

    @property
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build(self, saved: dict | None) -> None:
        """The model on the meta device where the parts start without a whole copy (a new
        run's registry model, or a run resumed from pieces); else whole, as `Trainer` builds
        it (then handed to the parts and, when `piecewise`, dropped)."""
        c = self.config
        self.piecewise = c.user is None and not c.bn_recalibrate and self.life.run is not None
        self.saved = saved
        if saved is not None and PIECES in saved and not self.piecewise:
            saved = {**saved, **assemble(saved, self.life.run.state_file(STATE))}
        if self.piecewise and c.init_from is None and (saved is None or PIECES in saved):
            with torch.device("meta"):  # draws the model's seed, as `Trainer` does
                self.model = build_model(c, self.data)
            self.optimizer = None
            return
        super().build(saved)

    def start(self) -> None:
        saved = self.saved
        if self.optimizer is not None:  # a whole copy here
            self.placed = self.runner.start(self.iteration,
                                            states=self.runner.states_of(self.optimizer))
            if self.piecewise:  # the parts hold it from here on
                self.model.to("meta")
                self.optimizer = None
        elif saved is not None:
            folder = pieces_folder(saved, self.life.run.state_file(STATE))
            self.placed = self.runner.start(
                self.iteration, files=[folder / name for name in saved[PIECES]["parts"]])
        else:
            self.placed = self.runner.start(
                self.iteration, init=(self.model.init_seed, self.model.init_rule))
        self.saved = None

    def train(self) -> None:
        self.life.log({"kind": "cluster", "iteration": self.iteration, "partitions": [
            {**info, "units": part.describe(), "macs": part.macs}
            for info, part in zip(self.placed, self.runner.parts)]})
        super().train()

    def compute(self, x: torch.Tensor, y: torch.Tensor,
                lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        # The partitions choose their own memory format.
        loss, wrong = self.runner.step(x, y, lr, self.iteration)
        for failure in self.runner.failures:  # partitions restarted in place
            self.life.counters["partition_failures"] += 1
            self.life.counters["partition_steps_lost"] += failure["steps_lost"]
            self.life.log({**failure, "wall_s": round(self.life.wall_s, 3)})
            self.life.say(f"{failure['actor']} failed and was restarted from its snapshot at "
                          f"step {failure['restored_step']} ({failure['steps_lost']} of its "
                          f"steps lost)")
        self.runner.failures.clear()
        return torch.tensor(loss), torch.tensor(wrong)

    def eval_model(self) -> torch.nn.Module:
        # --bn-recalibrate re-estimates the statistics on a model of its own: the gathered one.
        if self.config.bn_recalibrate:
            return super().eval_model()
        return PartitionedModel(self.runner)

    def trained_model(self) -> torch.nn.Module:
        """The whole model at the parameters `fit` ended with: brought home by the checkpoint
        every run writes at its end (and read from it by a run resumed at its end); a
        piecewise run's is assembled from that checkpoint when asked."""
        if not self.piecewise:
            return self.model
        from distbelief.api import load

        return load(self.life.run.path)

    def gather(self) -> None:
        """The partitions' weights and optimizer states, into the driver's model and
        optimizer (once per iteration; not in a piecewise run, which holds no whole copy)."""
        if self.piecewise:
            raise RuntimeError("a piecewise partitioned run holds no whole model to gather into")
        if self._gathered_at != self.iteration:
            self.runner.gather(self.optimizer)
            self._gathered_at = self.iteration

    def _params_finite(self) -> bool:
        return self.runner.finite() if self.piecewise else super()._params_finite()

    def save(self) -> None:
        """A checkpoint: a generation of the parts' pieces, written by the partitions, with
        last.pt (the run's state, and where the pieces are) published after them; a whole
        one when not `piecewise` (`Trainer.save`). Parameters holding NaN or Inf never
        replace a good checkpoint (`Diverged`)."""
        if not self.piecewise:
            return super().save()
        run = self.life.run
        folder, seen = begin_pieces(run)
        try:
            files, finite = self.runner.write_parts(folder, seen)
            if not finite:
                raise Diverged(f"the parameters are not finite at iteration {self.iteration}; "
                               f"lower --lr (the last checkpoint is kept)")
            (folder / MARKER).unlink()  # the partitions are done with it
            state = {**self.position_state(), PIECES: {
                "kind": "parts", "folder": folder.name, "bounds": list(self.runner.plan.bounds),
                "parts": [f.name for f in files]}}
            self.life.save_generation(self.config, state, {}, self.iteration, folder=folder,
                                      pieces=tuple(f.name for f in files))
        except BaseException:
            run.discard(folder)
            raise

    def record_extras(self) -> dict:
        return {"pipeline": self.runner.metrics()}

    def summary(self) -> dict:
        c = self.config.cluster
        counters = self.life.counters
        return {**super().summary(), "partitions": c.partitions,
                "micro_batches": c.micro_batches, "pipeline_schedule": c.pipeline_schedule,
                "pipeline_handoff": c.pipeline_handoff, "recompute": c.recompute,
                "partition_failures": counters["partition_failures"],
                "partition_steps_lost": counters["partition_steps_lost"]}

    def close(self) -> None:
        self.runner.close()


class PartitionedModel(torch.nn.Module):
    """The partitioned model as an evaluation sees it: `model(x)` is the partitions' output
    in eval mode (`PipelineRunner.infer`); it holds no parameters of its own."""

    def __init__(self, runner: PipelineRunner):
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.infer(x)
