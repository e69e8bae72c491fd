"""TrainConfig validation, coercion and round trips, its sections, configs written by older
versions; recipes."""

import pathlib

import pytest
import yaml

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
    # The sections' fields, each against the range declared beside it.
    ({"crop_size": 0}, "--crop-size must be positive, got 0"),
    ({"lighting": -0.1}, "--lighting must be >= 0, got -0.1"),
    ({"synthetic_shape": (3, 32)}, "--synthetic-shape must be three positive sizes"),
    ({"fetch_wait_s": -1.0}, "--fetch-wait-s must be >= 0"),
    ({"train_storage": "/shared/ray"}, "--train-storage applies to --mode sync"),
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


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, expected", [
    ("downpour", {"mode": "downpour", "replicas": 3, "ps_shards": 2, "n_fetch": 4, "n_push": 2,
                  "snapshot_every_s": 2.5, "max_restarts": 5, "replica_cpus": 1,
                  "momentum": 0.5}),
    ("sandblaster", {"mode": "sandblaster", "model": "softmax", "batch_size": 0, "portions": 24,
                     "history": 7, "dtype": "float64", "backup_tasks": False})])
def test_a_flat_config_yaml_written_before_the_sections_still_loads(name, expected):
    """config.yaml of distbelief 0.1.0 (one flat field list), read as --resume reads it."""
    from distbelief.engine.rundir import RunDir

    folder = FIXTURES / f"config-0.1.0-{name}.yaml"
    record = yaml.safe_load(folder.read_text())
    assert "cluster" not in record["config"]  # the old layout indeed
    config = TrainConfig.from_dict(record["config"])
    assert {k: config.get(k) for k in expected} == expected
    assert TrainConfig.from_dict(config.to_dict()) == config
    run = RunDir(pathlib.Path(__file__).parent / "no-such-run")
    run.config_file = folder
    assert run.read_config() == config


def test_the_data_sets_sections_hold_their_fields_and_read_flat_files():
    config = TrainConfig().replace(crop_size=192, synthetic_size=64)
    assert config.imagenet.crop_size == 192 and config.synthetic.synthetic_size == 64
    plain = config.to_dict()
    assert plain["imagenet"]["crop_size"] == 192 and "crop_size" not in plain
    assert TrainConfig.from_dict({"crop_size": 192, "synthetic_size": 64}) == config  # flat
    assert TrainConfig().replace(batch_size=0, mode="sandblaster").batch_size == 0  # the split
    assert TrainConfig().replace(mode="sync", train_storage="s3://b/p").cluster.train_storage


def test_sections_hold_each_scheme_s_fields_and_replace_takes_flat_names():
    config = TrainConfig().replace(lr=0.05, n_fetch=4, portions=8, replicas=3)
    assert (config.lr, config.downpour.n_fetch, config.sandblaster.portions,
            config.cluster.replicas) == (0.05, 4, 8, 3)
    assert config.get("n_fetch") == 4 and config.get("lr") == 0.05
    plain = config.to_dict()
    assert plain["downpour"]["n_fetch"] == 4 and "n_fetch" not in plain
    assert TrainConfig.from_dict(plain) == config
    with pytest.raises(ConfigError, match="unknown config field"):
        config.replace(n_fetches=4)
    with pytest.raises(ConfigError, match="--n-push must be positive"):
        config.replace(n_push=0)


@pytest.mark.parametrize("changes, message", [
    ({"mode": "sandblaster", "data": "imagenet", "data_dir": "x"}, "needs an in-memory dataset"),
    ({"mode": "downpour", "warmstart_steps": 64000}, "--warmstart-steps 64000 must be below"),
    ({"mode": "single", "batch_size": 0}, "--batch-size must be positive"),
    ({"eval_interval_s": float("inf")}, "--eval-interval-s must be >= 0"),
])
def test_rules_across_fields_are_checked_where_the_config_is_made(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().replace(**changes)


def test_resolve_applies_what_needs_the_data_and_check_model_what_needs_the_model():
    from distbelief.engine.config import check_model, resolve

    sandblaster = get_recipe("digits-sandblaster").replace(epochs=2.0)
    resolved = resolve(sandblaster, train_size=1437)
    assert resolved.iterations == 2 and resolved.sandblaster.portions == 32  # full batch
    check_model(resolved, values=650)
    with pytest.raises(ConfigError, match="needs a model without BatchNorm"):
        check_model(resolved, values=650, batchnorm=True)
    with pytest.raises(ConfigError, match="--portions 64 exceeds the 50 images"):
        resolve(sandblaster.replace(batch_size=50, portions=64), 1437)
    downpour = get_recipe("digits-downpour")
    with pytest.raises(ConfigError, match="30 replicas with batches of 64"):
        resolve(downpour.replace(replicas=30), 1437)
    with pytest.raises(ConfigError, match="--ps-shards 5 exceeds the model's 4 values"):
        check_model(downpour.replace(ps_shards=5), values=4)
    check_model(downpour.replace(ps_shards=4), values=4)
    assert resolve(downpour.replace(epochs=1.0), 1437).iterations == 23  # ceil(1437 / 64)
