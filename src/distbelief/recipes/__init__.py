"""The paper's training configurations, as functions returning a `TrainConfig`.

A recipe takes the model name because some settings depend on it (ResNet-110 and deeper warm
up, Sec. 4.2). The CLI calls `get_recipe(name, model)` and then overrides fields.
"""

from __future__ import annotations

from distbelief.engine.config import TrainConfig
from distbelief.errors import check_choice
from distbelief.models import model_info


def digits(model: str | None = None) -> TrainConfig:
    """The default job: a small ResNet on scikit-learn's 8x8 handwritten digits.

    1,437 training images, so 1,200 iterations of 64 is about 53 epochs; this reaches >= 97%
    test accuracy in well under a minute on two CPU cores. Digits are not mirror-symmetric, so
    no flips; a 1 px pad-and-crop is the translation augmentation at this scale.
    """
    return TrainConfig(
        recipe="digits", model=model or "resnet20", data="digits",
        batch_size=64, iterations=1200, lr=0.1, momentum=0.9, weight_decay=5e-4,
        milestones=(800, 1000), pad=1, flip=False,
        channels_last=True, log_every=25, eval_every=100, checkpoint_every=600,
        eval_batch_size=512)


def digits_downpour(model: str | None = None) -> TrainConfig:
    """The default job as Downpour SGD: 2 asynchronous replicas and 2 parameter-server shards
    on a local Ray, n_fetch = n_push = 1 as in the paper's experiments, the `digits` recipe
    otherwise unchanged.

    Iterations are minibatch gradients over both replicas, so the run sees as many images as
    `digits`. The recipe's momentum 0.9 stays: the shards correct for staleness
    (--staleness-rule, `distributed.downpour.rules`); without a correction this run stalls near
    40% test error.
    """
    return digits(model).replace(recipe="digits-downpour", mode="downpour", replicas=2,
                                 ps_shards=2)


def digits_sandblaster(model: str | None = None) -> TrainConfig:
    """Sandblaster L-BFGS on the digits: softmax regression (a smooth, convex objective: mean
    cross-entropy + 1e-4 / 2 |w|^2) on the whole training split as one batch, cut into 32
    portions for 2 replicas, with the vectors on 2 shards; history 10 and the strong-Wolfe line
    search, as torch.optim.LBFGS. L-BFGS stops early once the objective stops changing.
    """
    return TrainConfig().replace(
        recipe="digits-sandblaster", model=model or "softmax", data="digits",
        mode="sandblaster", replicas=2, ps_shards=2, batch_size=0, iterations=100, lr=1.0,
        weight_decay=1e-4, augment=False, history=10, log_every=10, eval_every=25,
        checkpoint_every=50, eval_batch_size=512)


def cifar10_paper(model: str | None = None) -> TrainConfig:
    """Sec. 4.2: batch 128, lr 0.1 / 10 at 32k and 48k, stop at 64k, wd 1e-4, momentum 0.9,
    pad-4 random crop and flip, per-pixel mean subtraction, option A shortcuts.

    ResNet-110 and deeper start at lr 0.01 until the training error is below 80% (about 400
    iterations in the paper), then go back to 0.1.
    """
    model = model or "resnet20"
    deep = model_info(model).depth >= 110
    return TrainConfig(
        recipe="cifar10-paper", model=model, data="cifar10", data_dir="data/cifar-10-batches-py",
        batch_size=128, iterations=64000, lr=0.1, momentum=0.9, weight_decay=1e-4,
        milestones=(32000, 48000), pad=4, flip=True,
        warmup_until_error=0.8 if deep else None, warmup_lr=0.01 if deep else None,
        warmup_iterations=0, log_every=100, eval_every=2000, checkpoint_every=2000)


def imagenet_paper(model: str | None = None) -> TrainConfig:
    """Sec. 3.4: batch 256, lr 0.1, wd 1e-4, momentum 0.9, up to 60e4 iterations; scale
    augmentation [256, 480], 224 crops with flips, per-pixel mean, PCA lighting.

    The paper divides the lr by 10 "when the error plateaus"; we use fixed milestones at 150k
    and 300k iterations (30 and 60 epochs of 1.28M images), the usual reading of that schedule.
    """
    return TrainConfig().replace(
        recipe="imagenet-paper", model=model or "resnet34", data="imagenet",
        data_dir="data/imagenet", batch_size=256, iterations=600000, lr=0.1, momentum=0.9,
        weight_decay=1e-4, milestones=(150000, 300000), crop_size=224, scale_min=256,
        scale_max=480, test_size=256, lighting=0.1, flip=True,
        log_every=100, eval_every=10000, checkpoint_every=5000, eval_batch_size=100)


RECIPES = {"digits": digits, "digits-downpour": digits_downpour,
           "digits-sandblaster": digits_sandblaster, "cifar10-paper": cifar10_paper, "imagenet-paper": imagenet_paper}


def get_recipe(name: str, model: str | None = None) -> TrainConfig:
    """The config of recipe `name` for `model` (the recipe's default model when None)."""
    check_choice("recipe", name, tuple(RECIPES))
    if model is not None:
        model_info(model)  # an unknown model fails here, with the list of names
    return RECIPES[name](model)
