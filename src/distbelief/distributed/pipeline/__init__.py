"""Model parallelism inside a replica (Dean et al., 2012, Sec. 3): a model cut into P parts,
each a Ray actor computing its layers, activations travelling forward and gradients backward
between them through Ray's object store, M micro-batches in flight (1F1B or GPipe's
fill-drain, with or without recomputation).

    partition.py   the partitioner: contiguous parts balanced by multiply-adds and
                   activations (no Ray)
    stage.py       Stage: one part's forward, backward and update (no Ray)
    schedule.py    Pipeline: one training step as calls to the stages, 1F1B or GPipe (no Ray)
    relay.py       direct hand-offs: each stage runs its own passes of a step and sends its
                   outputs to its neighbours through their mailboxes (no Ray)
    link.py        collective hand-offs: the same, as messages of a gloo group (no Ray)
    actors.py      StageActor: a Stage in its own process
    runner.py      PipelineRunner: the partition actors of a single-mode run
    trainer.py     PipelineTrainer: single mode with `--partitions P` (the trainer's loop)

Downpour's partitioned replicas (`downpour.partitioned`) are built from these pieces; nothing
here knows about Downpour.
"""

from distbelief.distributed.pipeline.partition import Part, Plan, partition, split_table
from distbelief.distributed.pipeline.schedule import Pipeline, local_pipeline, micro_batches
from distbelief.distributed.pipeline.stage import Stage

__all__ = ["Part", "Pipeline", "PipelineTrainer", "Plan", "Stage", "local_pipeline",
           "micro_batches", "partition", "split_table"]


def __getattr__(name):
    # The trainer imports Ray; keep importing the Ray-free core free of it.
    if name == "PipelineTrainer":
        from distbelief.distributed.pipeline.trainer import PipelineTrainer
        return PipelineTrainer
    raise AttributeError(name)
