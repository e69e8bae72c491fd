"""A synchronous rank's share of the global batch (`build_data(rows=...)`): exactly those rows
of the whole batch, augmented exactly as in it, and no more input work than its rows."""

import numpy as np
import pytest
import torch
from PIL import Image

from distbelief.data import build_data
from distbelief.data.augment import Rows, crop_flip, pca_lighting, step_generator
from distbelief.data.imagenet import EpochBatches
from distbelief.data.tensors import TensorSplit, TensorTrainStream
from distbelief.recipes import get_recipe

CPU = torch.device("cpu")


def digits(**kw):
    return get_recipe("digits").replace(batch_size=24, pad=2, flip=True, **kw)


@pytest.mark.parametrize("lo,hi", [(0, 8), (8, 16), (16, 24)])
def test_a_ranks_rows_are_the_global_batchs_rows_augmented_alike(lo, hi):
    c = digits()
    whole = build_data(c, CPU).train.batches(58)  # 59 batches an epoch: crosses into epoch 1
    mine = build_data(c, CPU, stats=None, rows=(lo, hi)).train.batches(58)
    for _ in range(3):
        (x, y), (xr, yr) = next(whole), next(mine)
        assert xr.shape[0] == hi - lo
        torch.testing.assert_close(xr, x[lo:hi], rtol=0, atol=0)
        assert torch.equal(yr, y[lo:hi])


def test_the_ranks_together_are_the_global_batch():
    c = digits()
    x, y = next(build_data(c, CPU).train.batches(5))
    parts = [next(build_data(c, CPU, rows=(r * 8, r * 8 + 8)).train.batches(5)) for r in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_a_rank_augments_only_its_own_rows(monkeypatch):
    import distbelief.data.streams as streams

    seen = []

    def spy(x, pad, flip, g, rows=None):
        seen.append(x.shape[0])
        return crop_flip(x, pad, flip, g, rows)

    monkeypatch.setattr(streams, "crop_flip", spy)
    next(build_data(digits(), CPU, rows=(8, 16)).train.batches(0))
    assert seen == [8]  # 1/3 of the global batch of 24, not all of it


def test_augmentation_of_rows_equals_the_rows_of_the_whole():
    x = torch.randn(10, 3, 6, 6)
    eigval, eigvec = torch.tensor([0.2, 0.1, 0.05]), torch.eye(3)
    for fn in (lambda t, g, r: crop_flip(t, 2, True, g, r),
               lambda t, g, r: crop_flip(t, 0, True, g, r),
               lambda t, g, r: pca_lighting(t, 0.1, eigval, eigvec, g, r)):
        whole = fn(x, step_generator(CPU, 3, 7), None)
        part = fn(x[4:9], step_generator(CPU, 3, 7), Rows(4, 9, 10))
        torch.testing.assert_close(part, whole[4:9], rtol=0, atol=0)
        other = fn(x[4:9], step_generator(CPU, 3, 8), Rows(4, 9, 10))
        assert not torch.equal(other, part)  # the draws do depend on the iteration


def test_tensor_streams_and_image_folders_take_the_same_rows():
    split = TensorSplit(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    whole = TensorTrainStream(split, 10, seed=1, device=CPU).batch(7)
    part = TensorTrainStream(split, 10, seed=1, device=CPU, rows=(5, 10)).batch(7)
    assert torch.equal(part[0], whole[0][5:10]) and torch.equal(part[1], whole[1][5:10])
    batches = iter(EpochBatches(50, 10, seed=2, start=3))
    mine = iter(EpochBatches(50, 10, seed=2, start=3, rows=(2, 6)))
    for _ in range(4):
        assert next(mine) == next(batches)[2:6]


def test_rows_outside_the_batch_are_refused():
    with pytest.raises(ValueError, match="rows"):
        build_data(digits(), CPU, rows=(20, 30))


def test_imagenet_folder_rows_equal_the_global_rows(tmp_path):
    root = tmp_path / "inet"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (44, 40, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    c = get_recipe("imagenet-paper").replace(
        data_dir=str(root), crop_size=32, scale_min=36, scale_max=40, test_size=36,
        batch_size=6, num_workers=0, stats_samples=4)
    x, y = next(build_data(c, CPU).train.batches(1))
    xr, yr = next(build_data(c, CPU, rows=(2, 4)).train.batches(1))
    torch.testing.assert_close(xr, x[2:4], rtol=0, atol=1e-6)
    assert torch.equal(yr, y[2:4])
