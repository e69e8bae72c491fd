"""TrainConfig validation, coercion and round trips; recipes."""

import pytest

from distbelief.engine.config import TrainConfig, coerce
from distbelief.errors import ConfigError
from distbelief.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("changes, message", [
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"lr": float("nan")}, "--lr must be a positive number"),
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"weight_decay": -1e-4}, "--weight-decay must be >= 0"),
    ({"milestones": (48000, 32000)}, "--milestones must be increasing"),
    ({"data": "mnist"}, "invalid dataset 'mnist'"),
    ({"shortcut": "D"}, "invalid shortcut option 'D'"),
    ({"data": "cifar10"}, "dataset cifar10 needs --data-dir"),
    ({"warmup_until_error": 1.5}, "--warmup-until-error is a fraction"),
    ({"data": "imagenet", "data_dir": "x", "crop_size": 300}, "--crop-size 300 exceeds"),
])
def test_impossible_values_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().replace(**changes)


def test_round_trip_through_plain_dict():
    config = get_recipe("cifar10-paper", "resnet110")
    plain = config.to_dict()
    assert plain["milestones"] == [32000, 48000]
    assert TrainConfig.from_dict(plain) == config


def test_from_dict_rejects_unknown_and_mistyped_fields():
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="--batch-size: cannot read 'many' as int"):
        TrainConfig.from_dict({"batch_size": "many"})


@pytest.mark.parametrize("name, text, value", [
    ("milestones", "10,20", (10, 20)), ("lr", "0.5", 0.5), ("warmup_lr", None, None),
    ("iterations", "7", 7), ("epochs", "2.5", 2.5), ("synthetic_shape", [1, 8, 8], (1, 8, 8)),
])
def test_coerce(name, text, value):
    assert coerce(name, text) == value


def test_coerce_refuses_fractional_ints_and_empty_required_values():
    with pytest.raises(ConfigError):
        coerce("batch_size", 1.5)
    with pytest.raises(ConfigError, match="cannot be empty"):
        coerce("lr", None)


def test_cifar_recipe_is_the_paper():
    c = get_recipe("cifar10-paper")
    assert (c.batch_size, c.lr, c.milestones, c.iterations) == (128, 0.1, (32000, 48000), 64000)
    assert (c.weight_decay, c.momentum, c.pad, c.flip) == (1e-4, 0.9, 4, True)
    assert c.warmup_until_error is None
    deep = get_recipe("cifar10-paper", "resnet110")
    assert (deep.warmup_until_error, deep.warmup_lr) == (0.8, 0.01)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds(name):
    assert get_recipe(name).recipe == name


def test_unknown_recipe_and_model():
    with pytest.raises(ConfigError, match="invalid recipe"):
        get_recipe("cifar100")
    with pytest.raises(ConfigError, match="unknown model"):
        get_recipe("digits", "resnet21")
