"""Data given as tensors or a torch `Dataset` through the Python API (`distbelief.fit`): any
inputs (images, feature vectors, frames), integer class labels (or real targets, --loss mse).

The split is materialized once as two tensors, which travel with the run's config to every
replica (an actor rebuilds its data from the config, as it does for the named datasets). The
training stream has the array datasets' semantics: a fixed permutation per epoch drawn from
(seed, epoch), so batch i is a pure function of (seed, i) and a run resumes anywhere; no
normalization or augmentation is applied (the inputs are used as given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from distbelief.data.augment import epoch_permutation
from distbelief.errors import ConfigError


@dataclass(frozen=True)
class TensorSplit:
    """One labelled split: `inputs` (N x ...) float32 and `labels` (N,) int64."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "TensorSplit":
        return TensorSplit(self.inputs[index], self.labels[index])


def as_split(data, name: str, classes: bool = True) -> TensorSplit:
    """`data` (an (inputs, labels) pair of tensors or a map-style `Dataset` of such pairs) as a
    `TensorSplit`: labels are class indices, or with `classes` False real-valued targets (N or
    N x D, kept as float32).

    Raises:
        ConfigError: `data` is empty, not (input, label) pairs, or its class labels are not
            integers.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) or hasattr(t, "__array__") for t in data):
        try:  # tensors or numpy arrays
            inputs, labels = (torch.as_tensor(t) for t in data)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{name}: cannot read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}) as tensors") from None
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
            data, (str, bytes)):
        inputs, labels = _stack(data, name, classes)
    else:
        raise ConfigError(f"{name} must be a map-style torch Dataset of (input, label) pairs or "
                          f"an (inputs, labels) pair of tensors, got {type(data).__name__}")
    if inputs.dim() == 0 or labels.dim() == 0:
        raise ConfigError(f"{name}: inputs and labels need one row per example, got shapes "
                          f"{tuple(inputs.shape)} and {tuple(labels.shape)}")
    if len(inputs) == 0:
        raise ConfigError(f"{name} is empty")
    if len(inputs) != len(labels):
        raise ConfigError(f"{name} has {len(inputs)} inputs but {len(labels)} labels")
    inputs = inputs.detach().float().cpu().contiguous()
    if not classes:
        if labels.is_complex():
            raise ConfigError(f"{name}: targets must be real numbers, got {labels.dtype}")
        return TensorSplit(inputs, labels.detach().float().cpu().contiguous())
    if labels.is_floating_point() or labels.is_complex() or labels.dim() != 1:
        raise ConfigError(f"{name}: labels must be one integer class index per example, got "
                          f"{labels.dtype} of shape {tuple(labels.shape)} (regression: "
                          f"loss='mse')")
    return TensorSplit(inputs, labels.detach().long().cpu().contiguous())


def _stack(dataset, name: str, classes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)
    if n == 0:
        raise ConfigError(f"{name} is empty")
    try:
        pairs = [dataset[i] for i in range(n)]
        inputs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
        # As given: a float label is refused by the caller's check, never truncated.
        labels = (torch.as_tensor([torch.as_tensor(y).item() for _, y in pairs]) if classes
                  else torch.stack([torch.as_tensor(y, dtype=torch.float32) for _, y in pairs]))
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        raise ConfigError(f"{name}: items must be (input, label) pairs of equal-shaped inputs "
                          f"and labels ({str(e).splitlines()[0][:120]})") from None
    return inputs, labels


class TensorTrainStream:
    """Endless training batches of a `TensorSplit` on `device`, one permutation per epoch; with
    `rows` (lo, hi), only those rows of each batch."""

    def __init__(self, split: TensorSplit, batch_size: int, seed: int, device: torch.device,
                 rows: tuple[int, int] | None = None):
        if len(split) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {len(split)} training "
                              f"examples")
        self.features, self.labels = split.inputs.to(device), split.labels.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.batches_per_epoch = len(split) // batch_size  # the last partial batch is dropped
        self.rows = slice(*rows) if rows is not None else slice(None)
        self._epoch, self._perm = None, None

    def inputs(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The inputs at `index`, as the model sees them (Sandblaster's portions)."""
        return self.features[index].to(dtype)

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(iteration, self.batches_per_epoch)
        if epoch != self._epoch:
            perm = epoch_permutation(len(self.labels), self.seed, epoch)
            self._epoch, self._perm = epoch, perm.to(self.device)
        index = self._perm[k * self.batch_size:(k + 1) * self.batch_size][self.rows]
        return self.features[index], self.labels[index]

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        iteration = start
        while True:
            yield self.batch(iteration)
            iteration += 1


class TensorEvalSource:
    """A `TensorSplit` in evaluation batches of `batch_size` on `device`."""

    def __init__(self, split: TensorSplit, batch_size: int, device: torch.device):
        self.split, self.batch_size, self.device = split, batch_size, device
        self.size = len(split)

    def batches(self, views: str = "center", scales=()):
        if views != "center":
            raise ConfigError("10-crop and multi-scale testing apply to imagenet data only")
        for lo in range(0, self.size, self.batch_size):
            yield (self.split.inputs[lo:lo + self.batch_size].to(self.device),
                   self.split.labels[lo:lo + self.batch_size].to(self.device))
