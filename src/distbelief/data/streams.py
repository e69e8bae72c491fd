"""In-memory image arrays (digits, CIFAR-10, synthetic) as a training stream and an evaluation
source: uint8 images kept on the training device, normalized and augmented a whole batch at a
time (`augment`)."""

from __future__ import annotations

from typing import Iterator

import torch

from distbelief.data.arrays import ImageArrays
from distbelief.data.augment import Rows, crop_flip, epoch_permutation, step_seed
from distbelief.data.bundle import Batch, EvalSource, TrainStream
from distbelief.errors import ConfigError


def _normalize(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255).sub_(mean)


class ArrayTrainStream(TrainStream):
    """An in-memory uint8 split kept on the device; pad-and-crop and flips done per batch. With
    `rows` (lo, hi), each batch is only those rows of the whole batch, loaded and augmented
    as they are in it (a synchronous rank's share)."""

    def __init__(self, data: ImageArrays, mean, batch_size, seed, device, augment, pad, flip,
                 rows: tuple[int, int] | None = None):
        if len(data) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {len(data)} training "
                              f"images")
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.mean, self.batch_size = mean.to(device), batch_size
        self.seed, self.device = seed, device
        self.augment, self.pad, self.flip = augment, pad, flip
        self.batches_per_epoch = len(data) // batch_size  # the last partial batch is dropped
        self.rows = None if rows is None else Rows(*rows, batch_size)
        self._epoch, self._perm = None, None
        # One generator, reseeded per iteration: a new one per step is a host-side allocation
        # (and on CUDA a device query) on every step.
        self._g = torch.Generator(device=device)

    def inputs(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The images at `index`, normalized, unaugmented, in `dtype` (Sandblaster's
        portions)."""
        return self.images[index].to(dtype).div_(255).sub_(self.mean)

    def batch(self, iteration: int) -> Batch:
        epoch, k = divmod(iteration, self.batches_per_epoch)
        if epoch != self._epoch:
            perm = epoch_permutation(len(self.labels), self.seed, epoch)
            self._epoch, self._perm = epoch, perm.to(self.device)
        index = self._perm[k * self.batch_size:(k + 1) * self.batch_size]
        if self.rows is not None:
            index = index[self.rows.lo:self.rows.hi]
        x = _normalize(self.images[index], self.mean)
        if self.augment:
            self._g.manual_seed(step_seed(self.seed, iteration))
            x = crop_flip(x, self.pad, self.flip, self._g, self.rows)
        return x, self.labels[index]

    def batches(self, start: int) -> Iterator[Batch]:
        iteration = start
        while True:
            yield self.batch(iteration)
            iteration += 1


class ArrayEvalSource(EvalSource):
    def __init__(self, data: ImageArrays, mean, batch_size, device):
        self.data, self.mean = data, mean.to(device)
        self.batch_size, self.device = batch_size, device
        self.size = len(data)

    def batches(self, views: str = "center", scales=()) -> Iterator[Batch]:
        if views != "center":
            raise ConfigError("10-crop and multi-scale testing apply to imagenet data only")
        for lo in range(0, self.size, self.batch_size):
            x = self.data.images[lo:lo + self.batch_size].to(self.device, non_blocking=True)
            y = self.data.labels[lo:lo + self.batch_size].to(self.device)
            yield _normalize(x, self.mean), y
