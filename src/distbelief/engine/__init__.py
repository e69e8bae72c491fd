"""Single-process training and evaluation."""

from distbelief.engine.checkpoint import load_checkpoint, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import evaluate
from distbelief.engine.schedule import LRSchedule
from distbelief.engine.trainer import Diverged, Trainer, TrainingInterrupted, load_for_eval

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "Diverged", "LRSchedule",
           "evaluate", "load_checkpoint", "save_checkpoint", "load_for_eval"]
