"""Single-mode model parallelism (`--partitions P`): `PipelineTrainer(config, run_dir).fit()`.

The single-process trainer's loop, run directory and checkpoints, with each step computed by
P partition actors on Ray (`runner.PipelineRunner`) instead of in this process. Evaluations
run through the partitions too (`PartitionedModel`: the driver sends images and gets logits).
This process keeps the whole model and optimizer only to checkpoint (and to re-estimate
BatchNorm statistics, --bn-recalibrate): the parts' weights and optimizer states come home
(`gather`) when they are read, once per iteration at most. A
partitioned run's checkpoint is an ordinary single-process checkpoint (`distbelief eval` reads
it; --resume may use another --partitions or none).
"""

from __future__ import annotations

import os

import torch

from distbelief.distributed.pipeline.runner import PipelineRunner
from distbelief.engine.config import TrainConfig
from distbelief.engine.trainer import Trainer, build_optimizer
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

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, progress: bool = False, address: str | None = None,
                 dashboard: bool = False):
        super().__init__(config, run_dir, resume=resume, progress=progress)
        sample = next(self.data.train.batches(0))[0][:1]  # one example, to cut by cost
        self.runner = PipelineRunner(self.config, self.model, sample, address, dashboard)
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

    def start(self) -> None:
        self.placed = self.runner.start(self.optimizer, build_optimizer, self.iteration)

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
        every run writes at its end (and read from it by a run resumed at its end)."""
        return self.model

    def gather(self) -> None:
        """The partitions' weights and optimizer states, into the driver's model and
        optimizer (once per iteration)."""
        if self._gathered_at != self.iteration:
            self.runner.gather(self.optimizer)
            self._gathered_at = self.iteration

    def record_extras(self) -> dict:
        return {"pipeline": self.runner.metrics()}

    def summary(self) -> dict:
        c = self.config.cluster
        counters = self.life.counters
        return {**super().summary(), "partitions": c.partitions,
                "micro_batches": c.micro_batches, "pipeline_schedule": c.pipeline_schedule,
                "recompute": c.recompute, "partition_failures": counters["partition_failures"],
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
