"""`build_data(config, device)`: the dataset a config names (or the one given to
`distbelief.fit`) as a `DataBundle` on one device, optionally one replica's part of it."""

from __future__ import annotations

from pathlib import Path

import torch

from distbelief.data import imagenet as inet
from distbelief.data.arrays import load_cifar10, load_digits, make_synthetic, split_off
from distbelief.data.bundle import DataBundle
from distbelief.data.streams import ArrayEvalSource, ArrayTrainStream
from distbelief.data.tensors import TensorEvalSource, TensorTrainStream
from distbelief.errors import ConfigError, DataError


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
               part: tuple[int, int] | None = None,
               rows: tuple[int, int] | None = None, arrays: tuple | None = None
               ) -> DataBundle:
    """Load `config.data` and wrap it for `device`. `stats` from a checkpoint replaces the
    statistics that would otherwise be computed from the training split. `part` = (r, n)
    restricts the training stream to replica r's slice of n (`data_part`); the statistics stay
    those of the whole split and the stream's seed becomes seed + r. `rows` = (lo, hi) makes
    each training batch rows lo..hi of the --batch-size batch, loaded and augmented exactly as
    they are in it and nothing else (a synchronous rank's share). `arrays`: what
    `load_arrays(config)` returned, to build several parts from one load (the virtual
    cluster's replicas); they are only read.

    Raises:
        DataError: the data folder is missing or malformed.
        ConfigError: settings the data cannot satisfy (batch larger than the split, ...).
    """
    c = config
    if rows is not None and not 0 <= rows[0] < rows[1] <= c.batch_size:
        raise ValueError(f"rows {rows} of a batch of {c.batch_size}")
    if c.data == "imagenet":
        return _build_folder(c, device, stats, part, rows)
    if c.user is not None:
        return _build_tensors(c, device, part, rows)
    train, test, classes = arrays or load_arrays(c)
    splits = {}
    if c.val_split:
        train, val = split_off(train, c.val_split)
        splits["val"] = val
    splits["test"] = test
    if stats is None:
        stats = {"mean": train.images.float().mean(0) / 255}
    _check_shape(stats["mean"], train.images.shape[1:])
    side = min(train.images.shape[2:])
    if c.pad > side:  # a crop of padding alone teaches nothing, and a huge pad fills memory
        raise ConfigError(f"--pad {c.pad} exceeds the images' {side} px side")
    index = data_part(len(train), part)
    if index is not None:
        train = train.subset(index)
    # A batch size of 0 (Sandblaster's whole-split batch) streams the whole split per batch.
    stream = ArrayTrainStream(train, stats["mean"], c.batch_size or len(train),
                              c.seed + (part or (0,))[0],
                              device, c.augment, c.pad, c.flip, rows)
    return DataBundle(
        name=c.data, num_classes=classes, in_chans=train.images.shape[1],
        train_size=len(train), stats=stats, train=stream,
        splits={k: ArrayEvalSource(v, stats["mean"], c.eval_batch_size, device)
                for k, v in splits.items()})


def load_arrays(c) -> tuple:
    """(train, test, classes) of the digits, CIFAR-10 or synthetic data of config `c`."""
    if c.data == "digits":
        return load_digits()
    if c.data == "cifar10":
        return load_cifar10(c.data_dir, download=c.download)
    synthetic = c.synthetic
    return make_synthetic(synthetic.synthetic_shape, synthetic.synthetic_classes,
                          synthetic.synthetic_size, c.seed)


def _check_shape(mean: torch.Tensor, shape) -> None:
    if tuple(mean.shape) != tuple(shape):
        raise DataError(f"the data's images are {tuple(shape)} but the checkpoint's mean image "
                        f"is {tuple(mean.shape)}: different data than the model was trained on")


def _build_tensors(c, device, part, rows) -> DataBundle:
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
                               device, rows)
    return DataBundle(
        name="custom", num_classes=user.num_classes,
        in_chans=train.inputs.shape[1] if train.inputs.dim() > 1 else 1,
        train_size=len(train), stats={}, train=stream,
        splits={k: TensorEvalSource(v, c.eval_batch_size, device)
                for k, v in evaluated.items()})


def _build_folder(c, device, stats, part, rows) -> DataBundle:
    if c.val_split:
        raise ConfigError("--val-split applies to in-memory datasets; imagenet has val/")
    root, i = Path(c.data_dir), c.imagenet
    train, classes = inet.scan_folder(root / "train")
    val, val_classes = inet.scan_folder(root / "val")
    inet.check_split_classes(classes, val_classes, root)
    if stats is None:
        stats = inet.image_stats(train, i.stats_samples, i.crop_size, i.test_size)
    _check_shape(stats["mean"], (3, i.crop_size, i.crop_size))
    index = data_part(len(train), part)
    if index is not None:
        train = [train[i] for i in index.tolist()]
        c = c.replace(seed=c.seed + part[0])
    dataset = inet.TrainImages(train, i.crop_size, i.scale_min, i.scale_max, c.flip, c.augment,
                               i.test_size)
    return DataBundle(
        name="imagenet", num_classes=len(classes), in_chans=3,
        train_size=len(train), stats=stats,
        train=inet.FolderTrainStream(dataset, stats, c, device, rows),
        splits={"test": inet.FolderEvalSource(val, stats, c, device)})
