"""ImageNet-style folders (`train/<class>/*.jpg`, `val/<class>/*.jpg`) with the paper's
augmentation (Sec. 3.4) and test views (center crop, 10-crop, multi-scale).

`FolderTrainStream` and `FolderEvalSource` are the `DataBundle`'s stream and sources over them.
Decoding, resizing and cropping happen per image in DataLoader workers (images differ in size);
lighting noise and mean subtraction happen per batch on the training device. Each training
sample carries its own seed, so augmentation does not depend on worker count or timing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from distbelief.data.augment import (Rows, colour_pca, epoch_permutation, pca_lighting,
                                     step_generator)
from distbelief.data.bundle import Batch, EvalSource, TrainStream
from distbelief.errors import ConfigError, DataError


class _LazyFunctional:
    """torchvision.transforms.functional, imported on first use: torchvision's import takes
    ~1.4 s (it pulls in torch._dynamo), paid otherwise by every process that touches
    distbelief.data, Ray actors included, even without image folders."""

    def __getattr__(self, name):
        from torchvision.transforms import functional

        return getattr(functional, name)


TF = _LazyFunctional()

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


def scan_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under `root/<class>/`, classes sorted by name."""
    if not root.is_dir():
        raise DataError(f"{root} does not exist; an ImageNet-style folder needs train/ and val/, "
                        f"each with one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders")
    samples = [(str(p), i) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
               if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    empty = sorted(set(classes) - {classes[i] for _, i in samples})
    if empty:  # a class without images would still count as an output of the model
        raise DataError(f"{root}: class folder(s) without images: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}")
    return samples, classes


def load_image(path: str):
    """The image at `path` as RGB.

    Raises:
        DataError: it cannot be read, or it has more pixels than PIL's decompression-bomb
            limit (`PIL.Image.MAX_IMAGE_PIXELS`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both are bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"cannot read image {path}: more than {Image.MAX_IMAGE_PIXELS} pixels "
                        f"(a decompression bomb?)") from None
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def center_view(img, size: int, crop: int) -> torch.Tensor:
    """Shorter side resized to `size`, centre `crop` x `crop`, as uint8 3 x crop x crop."""
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, size), crop))


class TrainImages(Dataset):
    """Scale augmentation: shorter side uniform in [scale_min, scale_max], a random crop and a
    random flip. Indexed by (sample index, sample seed) pairs from `EpochBatches`."""

    def __init__(self, samples, crop: int, scale_min: int, scale_max: int, flip: bool,
                 augment: bool, test_size: int):
        self.samples, self.crop, self.flip, self.augment = samples, crop, flip, augment
        self.scale_min, self.scale_max, self.test_size = scale_min, scale_max, test_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key
        path, label = self.samples[index]
        img = load_image(path)
        if not self.augment:
            return center_view(img, self.test_size, self.crop), label
        g = torch.Generator().manual_seed(seed)
        side = int(torch.randint(self.scale_min, self.scale_max + 1, (), generator=g))
        img = TF.resize(img, side)
        w, h = img.size
        top = int(torch.randint(0, h - self.crop + 1, (), generator=g))
        left = int(torch.randint(0, w - self.crop + 1, (), generator=g))
        img = TF.crop(img, top, left, self.crop, self.crop)
        if self.flip and torch.rand((), generator=g) < 0.5:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img), label


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, seed) from a seeded permutation per epoch, starting at iteration
    `start`; endless. Batch i of the whole run is a pure function of (seed, i). With `rows`
    (lo, hi), only those rows of each batch."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int,
                 rows: tuple[int, int] | None = None):
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.per_epoch = size // batch_size
        self.rows = (0, batch_size) if rows is None else rows

    def __iter__(self):
        iteration = self.start
        while True:
            epoch, k = divmod(iteration, self.per_epoch)
            perm = epoch_permutation(self.size, self.seed, epoch)
            for j in range(k, self.per_epoch):
                first = j * self.batch_size
                yield [(int(perm[p]), (self.seed * 1000003 + epoch) * 10000019 + p)
                       for p in range(first + self.rows[0], first + self.rows[1])]
            iteration = (epoch + 1) * self.per_epoch


class EvalViews(Dataset):
    """Test views of one image: `center` (3 x c x c), `tencrop` (10 x 3 x c x c: corners,
    centre and their mirrors) or `multiscale` (a list: each scale's full image and its mirror,
    for the fully-convolutional test of Sec. 3.4)."""

    def __init__(self, samples, mode: str, crop: int, test_size: int, scales=()):
        self.samples, self.mode, self.crop, self.test_size, self.scales = (
            samples, mode, crop, test_size, tuple(scales))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = load_image(path)
        if self.mode == "center":
            return center_view(img, self.test_size, self.crop), label
        if self.mode == "tencrop":
            crops = TF.ten_crop(TF.resize(img, self.test_size), self.crop)
            return torch.stack([TF.pil_to_tensor(c) for c in crops]), label
        views = []
        for s in self.scales:
            view = TF.pil_to_tensor(TF.resize(img, s))
            views += [view, view.flip(-1)]
        return views, label


def _collate_views(items):
    (views, label), = items
    return [v[None] for v in views], torch.tensor([label])


def image_stats(samples, count: int, crop: int, test_size: int, seed: int = 0) -> dict:
    """Mean image (3 x crop x crop, in [0, 1]) and colour PCA from `count` training images
    drawn by a seeded permutation, each seen through its centre view."""
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    views = torch.stack([center_view(load_image(samples[int(i)][0]), test_size, crop)
                         for i in perm[:count]]).float() / 255
    eigval, eigvec = colour_pca(views.permute(0, 2, 3, 1).reshape(-1, 3))
    return {"mean": views.mean(0), "eigval": eigval, "eigvec": eigvec}


def check_split_classes(train_classes, val_classes, root: Path):
    if train_classes != val_classes:
        raise DataError(f"{root}: train/ and val/ have different class folders "
                        f"({len(train_classes)} vs {len(val_classes)})")


def train_loader(dataset: TrainImages, batch_size: int, seed: int, start: int,
                 workers: int, pin: bool, rows: tuple[int, int] | None = None) -> DataLoader:
    sampler = EpochBatches(len(dataset), batch_size, seed, start, rows)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def test_loader(dataset: EvalViews, batch_size: int, workers: int, pin: bool) -> DataLoader:
    if dataset.mode == "multiscale":  # full images differ in size: one image per batch
        return DataLoader(dataset, batch_size=1, num_workers=workers, pin_memory=pin,
                          collate_fn=_collate_views)
    per_batch = max(1, batch_size // 10) if dataset.mode == "tencrop" else batch_size
    return DataLoader(dataset, batch_size=per_batch, num_workers=workers, pin_memory=pin)


def _reraise_worker_error(e: DataError):
    # A DataLoader worker's error arrives wrapped with its traceback; keep its one-line message.
    message = str(e).strip().splitlines()[-1]
    raise DataError(message.split("DataError: ", 1)[-1]) from None


class FolderTrainStream(TrainStream):
    """Training batches of decoded, augmented images on `device`; with `rows` (lo, hi), only
    those rows of each batch (a synchronous rank's share), each augmented as in the batch."""

    def __init__(self, dataset: TrainImages, stats, config, device,
                 rows: tuple[int, int] | None = None):
        self.dataset, self.stats, self.config, self.device = dataset, stats, config, device
        self.rows = rows
        self.batches_per_epoch = len(dataset) // config.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"--batch-size {config.batch_size} exceeds the "
                              f"{len(dataset)} training images")

    def batches(self, start: int) -> Iterator[Batch]:
        c, device = self.config, self.device
        mean = self.stats["mean"].to(device)
        loader = train_loader(self.dataset, c.batch_size, c.seed, start, c.imagenet.num_workers,
                              pin=device.type == "cuda", rows=self.rows)
        rows = None if self.rows is None else Rows(*self.rows, c.batch_size)
        try:
            for iteration, (x, y) in enumerate(loader, start):
                x = x.to(device, non_blocking=True).float().div_(255)
                if c.augment and c.imagenet.lighting:
                    g = step_generator(device, c.seed, iteration, stream=1)
                    x = pca_lighting(x, c.imagenet.lighting, self.stats["eigval"],
                                     self.stats["eigvec"], g, rows)
                yield x - mean, y.to(device, non_blocking=True)
        except DataError as e:
            _reraise_worker_error(e)


class FolderEvalSource(EvalSource):
    def __init__(self, samples, stats, config, device):
        self.samples, self.stats, self.config, self.device = samples, stats, config, device
        self.size = len(samples)

    def batches(self, views: str = "center", scales=()) -> Iterator[Batch]:
        c, device = self.config, self.device
        i = c.imagenet
        dataset = EvalViews(self.samples, views, i.crop_size, i.test_size, scales)
        loader = test_loader(dataset, c.eval_batch_size, i.num_workers, pin=device.type == "cuda")
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
