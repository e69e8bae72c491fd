"""ImageNet-style folders: scanning, scale augmentation, test views, broken inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from distbelief.data import build_data
from distbelief.data.imagenet import EpochBatches, EvalViews, TrainImages, scan_folder
from distbelief.engine.config import TrainConfig
from distbelief.errors import DataError

CLASSES = ("ant", "bee", "cow")


def make_image_folder(root, per_class=(6, 2), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 64, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def small_config(root, **kw):
    settings = dict(data="imagenet", data_dir=str(root), crop_size=32, scale_min=36,
                    scale_max=48, test_size=36, batch_size=6, eval_batch_size=4,
                    num_workers=0, stats_samples=10)
    return TrainConfig().replace(**{**settings, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("inet"))


def test_scan_folder_labels_by_sorted_class(folder):
    samples, classes = scan_folder(folder / "train")
    assert classes == list(CLASSES) and len(samples) == 18
    assert {label for _, label in samples} == {0, 1, 2}


def test_train_views_are_random_scaled_crops(folder):
    samples, _ = scan_folder(folder / "train")
    ds = TrainImages(samples, crop=32, scale_min=36, scale_max=48, flip=True, augment=True,
                     test_size=36)
    a, label = ds[(0, 11)]
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and label == 0
    assert torch.equal(ds[(0, 11)][0], a)  # the sample seed decides everything
    assert not all(torch.equal(ds[(0, s)][0], a) for s in range(12, 16))


def test_epoch_batches_resume_mid_epoch():
    full = iter(EpochBatches(20, 4, seed=1, start=0))
    batches = [next(full) for _ in range(12)]  # three epochs of five
    assert sorted(i for b in batches[:5] for i, _ in b) == list(range(20))
    later = iter(EpochBatches(20, 4, seed=1, start=7))
    assert next(later) == batches[7]


def test_test_views(folder):
    samples, _ = scan_folder(folder / "val")
    x, _ = EvalViews(samples, "tencrop", 32, 36)[0]
    assert x.shape == (10, 3, 32, 32)
    # The last five are crops of the mirrored image: its top-left is the top-right mirrored.
    assert torch.equal(x[5], x[1].flip(-1)) and torch.equal(x[9], x[4].flip(-1))
    views, _ = EvalViews(samples, "multiscale", 32, 36, scales=(32, 40))[0]
    assert [min(v.shape[1:]) for v in views] == [32, 32, 40, 40]


def test_bundle_streams_normalized_batches(folder):
    data = build_data(small_config(folder), torch.device("cpu"))
    assert (data.num_classes, data.train_size, data.stats["mean"].shape) == (3, 18, (3, 32, 32))
    x, y = next(data.train.batches(0))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (6,)
    x, y = next(data.splits["test"].batches("tencrop"))
    assert x.shape[1:] == (10, 3, 32, 32)


def test_missing_val_folder(tmp_path):
    make_image_folder(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val does not exist"):
        build_data(small_config(tmp_path), torch.device("cpu"))


def test_an_empty_class_folder_is_refused(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "ant-empty").mkdir()
    with pytest.raises(DataError, match="train: class folder\\(s\\) without images: ant-empty"):
        build_data(small_config(tmp_path), torch.device("cpu"))


@pytest.mark.parametrize("factor", [1.5, 3])  # PIL warns past the limit, raises past twice it
def test_a_decompression_bomb_is_one_data_error(tmp_path, monkeypatch, factor):
    make_image_folder(tmp_path)
    bomb = tmp_path / "val" / "bee" / "0.png"
    Image.new("RGB", (200, 200)).save(bomb)  # the others are at most 64 x 64
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(200 * 200 / factor))
    data = build_data(small_config(tmp_path), torch.device("cpu"))
    with pytest.raises(DataError, match="cannot read image .*0.png: more than .* pixels"):
        list(data.splits["test"].batches())


def test_unreadable_image_is_named(tmp_path):
    make_image_folder(tmp_path)
    bad = tmp_path / "val" / "bee" / "0.png"
    bad.write_bytes(b"garbage")
    data = build_data(small_config(tmp_path), torch.device("cpu"))
    with pytest.raises(DataError, match="cannot read image .*0.png"):
        list(data.splits["test"].batches())


@pytest.mark.subprocess  # DataLoader worker processes
def test_unreadable_image_from_a_worker_is_one_line(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "val" / "bee" / "0.png").write_bytes(b"garbage")
    data = build_data(small_config(tmp_path, num_workers=1), torch.device("cpu"))
    with pytest.raises(DataError) as info:
        list(data.splits["test"].batches())
    assert "\n" not in str(info.value) and "0.png" in str(info.value)
