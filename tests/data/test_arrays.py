"""In-memory datasets: digits split, CIFAR-10 folder validation and download, synthetic."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from distbelief.data import download_cifar10, load_cifar10, load_digits, make_synthetic
from distbelief.data.arrays import CIFAR10_TRAIN_FILES, split_off, write_cifar_batch
from distbelief.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_cifar_folder(root, per_batch=6, seed=0):
    """A CIFAR-shaped folder in the official layout with `per_batch` images per file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in (*CIFAR10_TRAIN_FILES, "test_batch"):
        write_cifar_batch(root / name, rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                          rng.integers(0, 10, per_batch))
    return root


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test, classes = load_digits()
    assert (len(train), len(test), classes) == (1437, 360, 10)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255
    # Stratified: every class holds about a fifth of its images in the test split.
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again, _, _ = load_digits()
    assert torch.equal(again.images, train.images)


def test_cifar_folder_round_trip(tmp_path):
    root = make_cifar_folder(tmp_path / "cifar-10-batches-py")
    train, test, classes = load_cifar10(root)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    raw = pickle.loads((root / "data_batch_1").read_bytes(), encoding="bytes")
    # The official layout is row-major R, G, B planes of 32x32.
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(raw[b"data"][0, 1024:2048]))
    assert train.labels[:6].tolist() == raw[b"labels"]


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "data_batch_3").unlink(), "data_batch_3 is missing"),
    (lambda r: (r / "test_batch").write_bytes(b"not a pickle"), "is not a CIFAR-10 python batch"),
    (lambda r: write_cifar_batch(r / "data_batch_1", np.zeros((2, 3072), np.uint8), [0, 10]),
     "labels range over 0..10"),
    (lambda r: (r / "data_batch_2").write_bytes(pickle.dumps(  # protocol 2, as the official files
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)),
     "expected (2, 3072) uint8"),
    # Labels of the wrong kind: a float would otherwise be truncated to a class in silence.
    *[(lambda r, labels=labels: (r / "data_batch_4").write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2)),
       f"labels must be a list of integers 0..9, got {kind}")
      for labels, kind in ((["cat", "dog"], "1-d <U3"), (None, "0-d object"),
                           ([[0, 1], [1, 0]], "2-d int64"), ([0.5, 1.0], "1-d float64"))],
])
def test_cifar_folder_damage_is_named(tmp_path, damage, message):
    root = make_cifar_folder(tmp_path / "c")
    damage(root)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_cifar10(root)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_loader_refuses_code_in_pickles(tmp_path, capsys):
    root = make_cifar_folder(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar10(root)
    assert "pwned" not in capsys.readouterr().out


def test_missing_cifar_folder_suggests_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_cifar10(tmp_path / "nothing")


def _archive(tmp_path):
    src = make_cifar_folder(tmp_path / "src" / "cifar-10-batches-py", per_batch=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(buf.getvalue())
    return path, hashlib.md5(buf.getvalue()).hexdigest()


def test_download_verifies_md5_and_unpacks(tmp_path):
    archive, md5 = _archive(tmp_path)
    root = tmp_path / "data" / "cifar-10-batches-py"
    download_cifar10(root, url=archive.as_uri(), md5=md5)
    train, test, _ = load_cifar10(root)
    assert len(train) == 15 and len(test) == 3


def test_download_with_wrong_md5_leaves_nothing(tmp_path):
    archive, _ = _archive(tmp_path)
    root = tmp_path / "data" / "cifar-10-batches-py"
    with pytest.raises(DataError, match="md5 mismatch"):
        download_cifar10(root, url=archive.as_uri(), md5="0" * 32)
    assert list((tmp_path / "data").iterdir()) == []


def test_unreachable_download_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot download"):
        download_cifar10(tmp_path / "c", url=(tmp_path / "absent.tar.gz").as_uri())


def test_split_off_is_disjoint_and_seed_independent():
    train, _, _ = make_synthetic((1, 4, 4), 3, 50, seed=1)
    rest, held = split_off(train, 10)
    assert len(rest) == 40 and len(held) == 10
    assert torch.equal(torch.cat([rest.images, held.images]).sort(0).values,
                       train.images.sort(0).values)
    with pytest.raises(DataError, match="--val-split"):
        split_off(train, 50)


def test_synthetic_shapes_and_seed():
    a, t, k = make_synthetic((2, 5, 7), 4, 16, seed=3)
    b, _, _ = make_synthetic((2, 5, 7), 4, 16, seed=3)
    assert a.images.shape == (16, 2, 5, 7) and len(t) == 2 and k == 4
    assert torch.equal(a.images, b.images) and int(a.labels.max()) < 4
