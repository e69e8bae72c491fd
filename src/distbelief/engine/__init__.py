"""Training and evaluation building blocks: the configuration, the run lifecycle every mode
shares, the base of every trainer, model and device setup, the single-process trainer,
evaluation, checkpoints. Nothing here imports from `distbelief.distributed`."""

from distbelief.engine.base import BaseTrainer
from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import evaluate
from distbelief.engine.lifecycle import Diverged, RunLifecycle, TrainingInterrupted
from distbelief.engine.schedule import LRSchedule
from distbelief.engine.trainer import Trainer, load_for_eval

__all__ = ["BaseTrainer", "TrainConfig", "Trainer", "TrainingInterrupted", "Diverged",
           "LRSchedule", "RunLifecycle", "evaluate", "load_checkpoint", "save_checkpoint",
           "load_for_eval"]
