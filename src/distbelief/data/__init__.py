"""Datasets and their training streams: `build_data(config, device)` -> `DataBundle`.

A training stream yields normalized, augmented batches already on the training device, and
batch i of a run is a pure function of (seed, i): resuming at iteration i needs no other state.
Images are scaled to [0, 1] and the per-pixel mean of the training split is subtracted
(Sec. 3.4 and 4.2); for multi-scale test views, whose size differs, the mean's per-channel
average is subtracted instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from distbelief.data import imagenet as inet
from distbelief.data.arrays import (ImageArrays, download_cifar10, load_cifar10, load_digits,
                                    make_synthetic, split_off, write_cifar_batch)
from distbelief.data.augment import (epoch_permutation, pca_lighting, random_crop, random_flip,
                                     step_generator)
from distbelief.data.tensors import TensorEvalSource, TensorTrainStream
from distbelief.errors import ConfigError, DataError

__all__ = ["DataBundle", "build_data", "ImageArrays", "load_digits", "load_cifar10",
           "download_cifar10", "make_synthetic", "write_cifar_batch"]

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


def _normalize(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255).sub_(mean)


class ArrayTrainStream(TrainStream):
    """An in-memory uint8 split kept on the device; pad-and-crop and flips done per batch."""

    def __init__(self, data: ImageArrays, mean, batch_size, seed, device, augment, pad, flip):
        if len(data) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {len(data)} training images")
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.mean, self.batch_size, self.seed, self.device = mean.to(device), batch_size, seed, device
        self.augment, self.pad, self.flip = augment, pad, flip
        self.batches_per_epoch = len(data) // batch_size  # the last partial batch is dropped
        self._epoch, self._perm = None, None

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
        x = _normalize(self.images[index], self.mean)
        if self.augment:
            g = step_generator(self.device, self.seed, iteration)
            x = random_crop(x, self.pad, g)
            if self.flip:
                x = random_flip(x, g)
        return x, self.labels[index]

    def batches(self, start: int) -> Iterator[Batch]:
        iteration = start
        while True:
            yield self.batch(iteration)
            iteration += 1


class ArrayEvalSource(EvalSource):
    def __init__(self, data: ImageArrays, mean, batch_size, device):
        self.data, self.mean, self.batch_size, self.device = data, mean.to(device), batch_size, device
        self.size = len(data)

    def batches(self, views: str = "center", scales=()) -> Iterator[Batch]:
        if views != "center":
            raise ConfigError("10-crop and multi-scale testing apply to imagenet data only")
        for lo in range(0, self.size, self.batch_size):
            x = self.data.images[lo:lo + self.batch_size].to(self.device, non_blocking=True)
            yield _normalize(x, self.mean), self.data.labels[lo:lo + self.batch_size].to(self.device)


def _reraise_worker_error(e: DataError):
    # A DataLoader worker's error arrives wrapped with its traceback; keep its one-line message.
    message = str(e).strip().splitlines()[-1]
    raise DataError(message.split("DataError: ", 1)[-1]) from None


class FolderTrainStream(TrainStream):
    def __init__(self, dataset: inet.TrainImages, stats, config, device):
        self.dataset, self.stats, self.config, self.device = dataset, stats, config, device
        self.batches_per_epoch = len(dataset) // config.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"--batch-size {config.batch_size} exceeds the "
                              f"{len(dataset)} training images")

    def batches(self, start: int) -> Iterator[Batch]:
        c, device = self.config, self.device
        mean = self.stats["mean"].to(device)
        loader = inet.train_loader(self.dataset, c.batch_size, c.seed, start, c.num_workers,
                                   pin=device.type == "cuda")
        try:
            for iteration, (x, y) in enumerate(loader, start):
                x = x.to(device, non_blocking=True).float().div_(255)
                if c.augment and c.lighting:
                    g = step_generator(device, c.seed, iteration, stream=1)
                    x = pca_lighting(x, c.lighting, self.stats["eigval"], self.stats["eigvec"], g)
                yield x - mean, y.to(device, non_blocking=True)
        except DataError as e:
            _reraise_worker_error(e)


class FolderEvalSource(EvalSource):
    def __init__(self, samples, stats, config, device):
        self.samples, self.stats, self.config, self.device = samples, stats, config, device
        self.size = len(samples)

    def batches(self, views: str = "center", scales=()) -> Iterator[Batch]:
        c, device = self.config, self.device
        dataset = inet.EvalViews(self.samples, views, c.crop_size, c.test_size, scales)
        loader = inet.test_loader(dataset, c.eval_batch_size, c.num_workers,
                                  pin=device.type == "cuda")
        mean = self.stats["mean"].to(device)
        channel_mean = mean.mean((1, 2), keepdim=True)
        try:
            for x, y in loader:
                y = y.to(device)
                if isinstance(x, list):
                    yield [v.to(device).float().div_(255) - channel_mean for v in x], y
                else:
                    yield x.to(device, non_blocking=True).float().div_(255) - mean, y
        except DataError as e:
            _reraise_worker_error(e)


def data_part(size: int, part: tuple[int, int] | None) -> torch.Tensor | None:
    """Indices of training images of replica r of n (`part` = (r, n)): every n-th image starting
    at r, so the parts are disjoint, differ in size by at most one, and part (0, 1) is the whole
    split in its order. None for no part."""
    if part is None:
        return None
    r, n = part
    if size < n:
        raise ConfigError(f"{n} replicas need at least {n} training images, there are {size}")
    return torch.arange(r, size, n)


def build_data(config, device: torch.device, stats: dict | None = None,
               part: tuple[int, int] | None = None) -> DataBundle:
    """Load `config.data` and wrap it for `device`. `stats` from a checkpoint replaces the
    statistics that would otherwise be computed from the training split. `part` = (r, n)
    restricts the training stream to replica r's slice of n (`data_part`); the statistics stay
    those of the whole split and the stream's seed becomes seed + r.

    Raises:
        DataError: the data folder is missing or malformed.
        ConfigError: settings the data cannot satisfy (batch larger than the split, ...).
    """
    c = config
    if c.data == "imagenet":
        return _build_folder(c, device, stats, part)
    if c.user is not None:
        return _build_tensors(c, device, part)
    if c.data == "digits":
        train, test, classes = load_digits()
    elif c.data == "cifar10":
        train, test, classes = load_cifar10(c.data_dir, download=c.download)
    else:
        train, test, classes = make_synthetic(c.synthetic_shape, c.synthetic_classes,
                                              c.synthetic_size, c.seed)
    splits = {}
    if c.val_split:
        train, val = split_off(train, c.val_split)
        splits["val"] = val
    splits["test"] = test
    if stats is None:
        stats = {"mean": train.images.float().mean(0) / 255}
    _check_shape(stats["mean"], train.images.shape[1:])
    index = data_part(len(train), part)
    if index is not None:
        train = train.subset(index)
    # A batch size of 0 (Sandblaster's whole-split batch) streams the whole split per batch.
    stream = ArrayTrainStream(train, stats["mean"], c.batch_size or len(train),
                              c.seed + (part or (0,))[0],
                              device, c.augment, c.pad, c.flip)
    return DataBundle(
        name=c.data, num_classes=classes, in_chans=train.images.shape[1],
        train_size=len(train), stats=stats, train=stream,
        splits={k: ArrayEvalSource(v, stats["mean"], c.eval_batch_size, device)
                for k, v in splits.items()})


def _check_shape(mean: torch.Tensor, shape) -> None:
    if tuple(mean.shape) != tuple(shape):
        raise DataError(f"the data's images are {tuple(shape)} but the checkpoint's mean image "
                        f"is {tuple(mean.shape)}: different data than the model was trained on")


def _build_tensors(c, device, part) -> DataBundle:
    """The splits given to `distbelief.fit` (`c.user`); without a test split, the training
    split is evaluated (as "train")."""
    user = c.user
    train = user.train
    index = data_part(len(train), part)
    if index is not None:
        train = train.subset(index)
    if c.channels_last and train.inputs.dim() != 4:
        raise ConfigError(f"--channels-last needs 4-d inputs (N x C x H x W); these are "
                          f"{train.inputs.dim()}-d")
    evaluated = {"test": user.test} if user.test is not None else {"train": user.train}
    stream = TensorTrainStream(train, c.batch_size or len(train), c.seed + (part or (0,))[0],
                               device)
    return DataBundle(
        name="custom", num_classes=user.num_classes,
        in_chans=train.inputs.shape[1] if train.inputs.dim() > 1 else 1,
        train_size=len(train), stats={}, train=stream,
        splits={k: TensorEvalSource(v, c.eval_batch_size, device)
                for k, v in evaluated.items()})


def _build_folder(c, device, stats, part) -> DataBundle:
    if c.val_split:
        raise ConfigError("--val-split applies to in-memory datasets; imagenet has val/")
    root = Path(c.data_dir)
    train, classes = inet.scan_folder(root / "train")
    val, val_classes = inet.scan_folder(root / "val")
    inet.check_split_classes(classes, val_classes, root)
    if stats is None:
        stats = inet.image_stats(train, c.stats_samples, c.crop_size, c.test_size)
    _check_shape(stats["mean"], (3, c.crop_size, c.crop_size))
    index = data_part(len(train), part)
    if index is not None:
        train = [train[i] for i in index.tolist()]
        c = c.replace(seed=c.seed + part[0])
    dataset = inet.TrainImages(train, c.crop_size, c.scale_min, c.scale_max, c.flip, c.augment,
                               c.test_size)
    return DataBundle(
        name="imagenet", num_classes=len(classes), in_chans=3,
        train_size=len(train), stats=stats, train=FolderTrainStream(dataset, stats, c, device),
        splits={"test": FolderEvalSource(val, stats, c, device)})
