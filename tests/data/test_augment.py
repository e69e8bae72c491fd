"""Batch augmentation on the device and the training stream's determinism."""

import torch

from distbelief.data import build_data
from distbelief.data.augment import (colour_pca, crop_flip, pca_lighting, step_generator,
                                     step_seed)
from distbelief.engine.config import TrainConfig


def test_crop_flip_takes_windows_of_the_zero_padded_image_mirrored_or_not():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for flip in (False, True):
        out = crop_flip(x, 2, flip, step_generator(torch.device("cpu"), 0, 7))
        assert out.shape == x.shape
        for b in range(2):
            windows = [padded[b, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
            if flip:
                windows += [w.flip(2) for w in windows]
            assert any(torch.equal(out[b], w) for w in windows)


def test_crop_flip_is_the_crop_then_the_mirror_its_draw_encodes():
    """The reference: per image, slice the window at (r % S, r // S % S) and mirror it when
    r // S^2 is 1, with r the one integer drawn per image."""
    x = torch.randn(64, 2, 4, 6)
    pad, side = 1, 3
    out = crop_flip(x, pad, True, torch.Generator().manual_seed(5))
    r = torch.randint(0, side * side * 2, (64, 1), generator=torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for b in range(64):
        k = int(r[b])
        dy, dx, mirrored = k % side, k // side % side, k // (side * side)
        want = padded[b, :, dy:dy + 4, dx:dx + 6]
        assert torch.equal(out[b], want.flip(2) if mirrored else want), (b, k)


def test_crop_offsets_cover_the_whole_range_and_flips_half():
    x = torch.zeros(4000, 1, 3, 3)
    x[:, :, 1, 1] = 1  # a marked centre pixel shows where each crop came from
    out = crop_flip(x, 1, False, step_generator(torch.device("cpu"), 0, 0))
    positions = {tuple(p.tolist()) for p in out[:, 0].flatten(1).argmax(1, keepdim=True)}
    assert len(positions) == 9
    row = torch.arange(4.0).view(1, 1, 1, 4).expand(1000, 1, 1, 4)
    out = crop_flip(row, 0, True, step_generator(torch.device("cpu"), 1, 2))
    flipped = (out[:, 0, 0, 0] == 3).float().mean()
    assert 0.4 < flipped < 0.6
    assert torch.equal(out[out[:, 0, 0, 0] == 3][0, 0, 0], torch.tensor([3.0, 2, 1, 0]))
    assert torch.equal(out[out[:, 0, 0, 0] == 0][0, 0, 0], torch.tensor([0.0, 1, 2, 3]))
    assert crop_flip(row, 0, False, torch.Generator()) is row  # nothing to do


def test_one_reseeded_generator_draws_what_a_new_one_per_step_draws():
    g = torch.Generator()
    for it in (0, 1, 9):
        g.manual_seed(step_seed(4, it))
        fresh = step_generator(torch.device("cpu"), 4, it)
        assert torch.equal(torch.randint(0, 99, (8,), generator=g),
                           torch.randint(0, 99, (8,), generator=fresh))


def test_lighting_adds_one_colour_shift_per_image():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(5000, 3, generator=g) @ torch.tensor([[1.0, 0.5, 0.2], [0, 1, 0.3], [0, 0, 1]])
    eigval, eigvec = colour_pca(pixels)
    assert eigval[0] >= eigval[1] >= eigval[2] > 0
    assert torch.allclose(eigvec.T @ eigvec, torch.eye(3), atol=1e-5)
    x = torch.zeros(4, 3, 2, 2)
    out = pca_lighting(x, 0.1, eigval, eigvec, step_generator(torch.device("cpu"), 0, 0))
    assert torch.equal(out[:, :, :1, :1].expand_as(out), out)  # constant over each image
    assert out.abs().sum() > 0


def test_stream_batch_is_a_function_of_seed_and_iteration():
    config = TrainConfig().replace(data="synthetic", synthetic_size=64, synthetic_shape=(3, 8, 8),
                         batch_size=16, pad=2)
    stream = build_data(config, torch.device("cpu")).train
    it = stream.batches(0)
    sequence = [next(it) for _ in range(10)]
    x6, y6 = next(build_data(config, torch.device("cpu")).train.batches(6))
    assert torch.equal(x6, sequence[6][0]) and torch.equal(y6, sequence[6][1])
    other = build_data(config.replace(seed=1), torch.device("cpu")).train
    assert not torch.equal(next(other.batches(6))[0], x6)


def test_each_epoch_visits_every_image_once():
    config = TrainConfig().replace(data="synthetic", synthetic_size=64, synthetic_shape=(1, 4, 4),
                         synthetic_classes=64, batch_size=16, augment=False)
    data = build_data(config, torch.device("cpu"))
    # Distinct images: identify each by its mean-subtracted pixels.
    stream = data.train.batches(4)  # the second epoch
    seen = torch.cat([next(stream)[0].flatten(1) for _ in range(4)])
    assert len(torch.unique(seen, dim=0)) == 64


def test_crop_flip_is_five_kernels_per_batch_once_its_tables_exist():
    """The draw, two table lookups, the pad and the gather: what a GPU step waits on outside
    its graphs. An index table rebuilt per batch, or a flip done as its own pass, fails."""
    from torch.profiler import profile

    x, g = torch.randn(32, 3, 8, 8), torch.Generator()
    crop_flip(x, 2, True, g)  # builds the tables for this shape
    with profile() as prof:
        crop_flip(x, 2, True, g)
    ops = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")
           and e.name not in ("aten::unsqueeze", "aten::slice", "aten::select")]
    assert sorted(ops) == ["aten::index"] * 3 + ["aten::pad", "aten::randint"], ops
