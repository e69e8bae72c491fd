"""Datasets and their training streams: `build_data(config, device)` -> `DataBundle`.

A training stream yields normalized, augmented batches already on the training device, and
batch i of a run is a pure function of (seed, i): resuming at iteration i needs no other state.
Images are scaled to [0, 1] and the per-pixel mean of the training split is subtracted
(Sec. 3.4 and 4.2); for multi-scale test views, whose size differs, the mean's per-channel
average is subtracted instead.

    bundle.py    DataBundle, the TrainStream and EvalSource interfaces, BatchCursor
    build.py     build_data: the named dataset (or the one given to fit) for a device
    arrays.py    in-memory datasets: the 8x8 digits, CIFAR-10 (its files, its download),
                 synthetic images
    streams.py   in-memory arrays as a training stream and an evaluation source
    augment.py   batch augmentation on the device: pad and crop, flips, PCA lighting
    imagenet.py  ImageNet-style folders: scanning, decoding, the paper's augmentation and
                 test views, and their stream and source
    tensors.py   data given to `distbelief.fit` as tensors or a Dataset
"""

from distbelief.data.arrays import (ImageArrays, download_cifar10, load_cifar10, load_digits,
                                    make_synthetic, write_cifar_batch)
from distbelief.data.build import build_data, data_part
from distbelief.data.bundle import BatchCursor, DataBundle, EvalSource, TrainStream

__all__ = ["BatchCursor", "DataBundle", "EvalSource", "ImageArrays", "TrainStream",
           "build_data", "data_part", "download_cifar10", "load_cifar10", "load_digits",
           "make_synthetic", "write_cifar_batch"]
