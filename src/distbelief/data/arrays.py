"""Datasets small enough to live in memory as one uint8 tensor: digits, CIFAR-10, synthetic.

Every loader returns `ImageArrays` (uint8 images N x C x H x W, int64 labels N) on the CPU.
Folders are validated by structure and content; anything wrong is a `DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distbelief.errors import ConfigError, DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# The split of the digits data never depends on the run's seed: test numbers stay comparable.
SPLIT_SEED = 0


@dataclass
class ImageArrays:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageArrays":
        return ImageArrays(self.images[index], self.labels[index])


def split_off(data: ImageArrays, count: int) -> tuple[ImageArrays, ImageArrays]:
    """Hold out `count` images chosen by a fixed seeded permutation: (rest, held_out)."""
    if not 0 < count < len(data):
        raise DataError(f"--val-split {count} must be between 1 and {len(data) - 1}, "
                        f"the training split has {len(data)} images")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return data.subset(perm[count:].sort().values), data.subset(perm[:count].sort().values)


def load_digits() -> tuple[ImageArrays, ImageArrays, int]:
    """scikit-learn's 1,797 8x8 digits, stratified 80/20 into (train, test, classes).

    Pixel values 0..16 are scaled to 0..255 so that every dataset shares one uint8 layout.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.2,
                                              stratify=bunch.target, random_state=SPLIT_SEED)
    return _arrays(x_tr, y_tr), _arrays(x_te, y_te), 10


def _arrays(images: np.ndarray, labels) -> ImageArrays:
    return ImageArrays(torch.from_numpy(np.ascontiguousarray(images)),
                       torch.as_tensor(np.asarray(labels), dtype=torch.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # protocol-2 pickles of bytes written by Python 3

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} is missing; expected the official cifar-10-batches-py layout "
                        f"(data_batch_1..5, test_batch); pass --download to fetch it")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as e:  # any unpickling failure means the file is not a CIFAR batch
        raise DataError(f"{path} is not a CIFAR-10 python batch "
                        f"({type(e).__name__}: {e})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be a list of integers 0..9, got "
                        f"{labels.ndim}-d {labels.dtype}")
    n = len(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (n, 3072) or n == 0:
        raise DataError(f"{path}: data has shape {data.shape} and dtype {data.dtype}; expected "
                        f"({n}, 3072) uint8, one row per label")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}, expected 0..9")
    return data.reshape(n, 3, 32, 32), labels


def load_cifar10(root: str | os.PathLike, download: bool = False
                 ) -> tuple[ImageArrays, ImageArrays, int]:
    """CIFAR-10 from the official python layout at `root`: (train, test, classes).

    Raises:
        DataError: a missing folder or file, or a file that is not a CIFAR batch.
    """
    root = Path(root)
    if download and not (root / CIFAR10_TEST_FILE).exists():
        download_cifar10(root)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist; pass --download to fetch it")
    train = [_read_cifar_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    x_te, y_te = _read_cifar_batch(root / CIFAR10_TEST_FILE)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return _arrays(x_tr, y_tr), _arrays(x_te, y_te), 10


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: str | os.PathLike, url: str = CIFAR10_URL,
                     md5: str = CIFAR10_MD5) -> Path:
    """Fetch the official archive, check its md5 and unpack it into `root` atomically.

    `root` names the cifar-10-batches-py folder itself. The archive is unpacked into a temporary
    folder beside `root` and renamed, so an interrupted download leaves nothing half-written.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".cifar-download-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
        if _md5(archive) != md5:
            raise DataError(f"{url}: md5 mismatch, the download is corrupt; try again")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot unpack {url}: {e}") from None
        unpacked = Path(tmp) / "cifar-10-batches-py"
        if not unpacked.is_dir():
            raise DataError(f"{url} does not hold a cifar-10-batches-py folder")
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)
    return root


def make_synthetic(shape: tuple[int, ...], classes: int, size: int, seed: int
                   ) -> tuple[ImageArrays, ImageArrays, int]:
    """Uniform random images with random labels (train `size`, test `size // 8`), for timing.

    Raises:
        ConfigError: they would take more than half of this machine's memory."""
    images = size + max(1, size // 8)
    need, have = images * math.prod(shape), physical_memory()
    if have and need > have // 2:
        raise ConfigError(f"--synthetic-size {size} images of {','.join(map(str, shape))} "
                          f"(and {images - size} test images) take {need / 2**30:.1f} GiB, more "
                          f"than half of this machine's {have / 2**30:.1f} GiB")
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return ImageArrays(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                           torch.randint(0, classes, (n,), generator=g))

    return draw(size), draw(max(1, size // 8)), classes


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels) -> None:
    """Write a batch in the official layout (used to make small CIFAR-shaped folders)."""
    payload = {b"data": np.asarray(images, np.uint8).reshape(len(labels), 3072),
               b"labels": [int(v) for v in labels]}
    buf = io.BytesIO()
    pickle.dump(payload, buf, protocol=2)
    Path(path).write_bytes(buf.getvalue())


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0
