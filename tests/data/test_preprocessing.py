"""The paper's CIFAR-10 preprocessing, pinned value by value (Sec. 4.2): images scaled to [0, 1]
with the per-pixel mean of the *training* split subtracted, in training and test alike; a 4 px
zero pad (after the mean subtraction) and a random 32x32 crop plus a random mirror in training
only; the test split seen as its single original view."""

import pytest
import torch
import torch.nn.functional as F

from distbelief.data import build_data
from distbelief.data.arrays import load_cifar10
from distbelief.recipes import get_recipe

from data.test_arrays import make_cifar_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = make_cifar_folder(tmp_path_factory.mktemp("pre") / "cifar-10-batches-py", per_batch=8)
    train, test, _ = load_cifar10(root)
    config = get_recipe("cifar10-paper").replace(data_dir=str(root), batch_size=8,
                                                 eval_batch_size=16, device="cpu")
    return config, train, test


def _expected(images: torch.Tensor, train_images: torch.Tensor) -> torch.Tensor:
    # Written out in float64 from the uint8 files, independently of the code under test.
    mean = train_images.double().div(255).mean(0)
    return images.double().div(255) - mean


def test_the_recipe_is_the_papers():
    c = get_recipe("cifar10-paper")
    assert (c.pad, c.flip, c.augment, c.data) == (4, True, True, "cifar10")
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (c.milestones, c.iterations) == ((32000, 48000), 64000)


def test_test_split_is_the_original_view_minus_the_training_mean(cifar):
    config, train, test = cifar
    data = build_data(config, torch.device("cpu"))
    x, y = next(data.splits["test"].batches())
    torch.testing.assert_close(x.double(), _expected(test.images, train.images),
                               atol=1e-6, rtol=0)
    assert torch.equal(y, test.labels)
    # The mean is the training split's, not the test split's own: a test-mean would differ.
    assert not torch.allclose(x.double().mean(0), torch.zeros(3, 32, 32, dtype=torch.float64),
                              atol=1e-3)


def test_training_without_augmentation_is_the_normalized_image(cifar):
    config, train, _ = cifar
    data = build_data(config.replace(augment=False), torch.device("cpu"))
    x, y = data.train.batch(0)
    perm = data.train._perm[:config.batch_size]
    torch.testing.assert_close(x.double(), _expected(train.images[perm], train.images),
                               atol=1e-6, rtol=0)
    assert torch.equal(y, train.labels[perm])


def test_training_views_are_padded_crops_or_their_mirrors(cifar):
    config, train, _ = cifar
    data = build_data(config, torch.device("cpu"))
    seen_shift = seen_flip = False
    for iteration in range(4):
        x, _ = data.train.batch(iteration)
        k = iteration % data.train.batches_per_epoch
        index = data.train._perm[k * config.batch_size:(k + 1) * config.batch_size]
        full = F.pad(_expected(train.images[index], train.images), (4, 4, 4, 4))  # zeros = mean
        for view, padded in zip(x.double(), full):
            matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                       if torch.allclose(view, (padded.flip(2) if flip else padded)
                                         [:, dy:dy + 32, dx:dx + 32], atol=1e-6)]
            assert matches, "a training view is not a 32x32 crop of the 4 px padded image"
            seen_shift |= any((dy, dx) != (4, 4) for dy, dx, _ in matches)
            seen_flip |= all(flip for _, _, flip in matches)
    assert seen_shift and seen_flip  # both augmentations are on, not just allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sandblaster_inputs_are_the_same_normalized_images(cifar, dtype):
    """Sandblaster's portions (`inputs`: unaugmented, in the objective's dtype) get the same
    training-split per-pixel mean subtracted as the trainer's batches (the mean is held in
    float32, hence the float32 tolerance in float64 too)."""
    config, train, _ = cifar
    stream = build_data(config, torch.device("cpu")).train
    index = torch.tensor([5, 0, 17, 3])
    x = stream.inputs(index, dtype)
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), _expected(train.images[index], train.images),
                               atol=1e-6, rtol=0)
    # Not the test split's mean, nor a per-channel one: those differ by far more than 1e-6.
    per_channel = train.images.double().div(255).mean((0, 2, 3))[:, None, None]
    assert (x.double() - (train.images[index].double().div(255) - per_channel)).abs().max() > 1e-3
