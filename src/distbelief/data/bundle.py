"""What every dataset offers a trainer: a `DataBundle` of one training stream and evaluation
sources on one device, the stream and source interfaces, and `BatchCursor`, a replica's view of
a stream chunk after chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataBundle:
    """A dataset ready for training and evaluation on one device.

    `stats` (the mean image and, for ImageNet, the colour PCA) is saved in checkpoints, so an
    evaluation normalizes exactly as training did.
    """

    name: str
    num_classes: int
    in_chans: int
    train_size: int
    stats: dict[str, torch.Tensor]
    train: "TrainStream"
    splits: dict[str, "EvalSource"] = field(default_factory=dict)


class TrainStream:
    """Endless training batches on `device`; `batches(start)` begins at iteration `start`."""

    batches_per_epoch: int

    def batches(self, start: int) -> Iterator[Batch]:
        raise NotImplementedError


class BatchCursor:
    """A `TrainStream`'s batches for chunks of steps: `at(start)` is an iterator from step
    `start`, the same sequential stream when the last chunk ended there (`ended(end)`), a new
    one on a jump or after `lost()` (a chunk that stopped midway left the stream somewhere in
    it). Replicas train chunk after chunk, so a stream is restarted only when work moves."""

    def __init__(self, stream: TrainStream):
        self.stream, self.position, self.iterator = stream, None, None

    def at(self, start: int) -> Iterator[Batch]:
        if self.position != start:
            self.iterator = self.stream.batches(start)
        self.position = start
        return self.iterator

    def ended(self, end: int) -> None:
        self.position = end

    def lost(self) -> None:
        self.position = None


class EvalSource:
    """Test-time batches; `views` is 'center', 'tencrop' or 'multiscale'.

    x is B x C x H x W, B x V x C x H x W (V views of each image) or a list of 1 x C x h x w
    views of one image; a classifier averages its softmax over the views.
    """

    size: int

    def batches(self, views: str = "center", scales=()) -> Iterator[Batch]:
        raise NotImplementedError
