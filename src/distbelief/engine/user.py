"""A model and data given through the Python API (`distbelief.fit`) rather than by name.

They ride inside the run's config (`TrainConfig.user`, never written to config.yaml): every
process that builds the model or the data (the trainer, each Downpour or Sandblaster replica,
the driver that evaluates) rebuilds them from the config, as it does for the named ones. On Ray
the config travels pickled (cloudpickle), so the factory must be picklable there: a function
or class defined in the script that calls `fit`, or importable on every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from distbelief.data.tensors import TensorSplit
from distbelief.errors import ConfigError


@dataclass(frozen=True)
class UserParts:
    """`build()` makes the model (a fresh module each call: an initialization or a copy of
    the one given); `train` and `test` are the splits; `num_classes` the model's outputs."""

    build: Callable[[], torch.nn.Module]
    train: TensorSplit
    test: TensorSplit | None
    num_classes: int

    def model(self) -> torch.nn.Module:
        model = self.build()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"the model factory returned {type(model).__name__}, not a "
                              f"torch.nn.Module")
        return model
