"""What each budget trains: the paper's recipe unchanged for full, scaled down for short and
medium; how seeds make runs."""

import pytest

from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe
from distbelief.paper.budgets import Options, check_models, run_config


def test_full_is_the_papers_recipe():
    options = Options(budget="full", data_dir="/data/cifar")
    assert options.dataset == "cifar10" and options.tag == "full-cifar10"
    for model in ("resnet20", "resnet110"):
        got = run_config(model, options)
        want = get_recipe("cifar10-paper", model).replace(data_dir="/data/cifar")
        # Only the run's bookkeeping differs: every field of the recipe itself is the paper's.
        assert got.replace(recipe=want.recipe) == want
    assert run_config("resnet110", options).warmup_until_error == 0.8


def test_short_scales_the_schedule_down():
    digits = run_config("plain56", Options())
    assert (digits.data, digits.iterations, digits.milestones, digits.batch_size) == (
        "digits", 600, (400, 500), 64)
    cifar = run_config("resnet20", Options(data="cifar10", data_dir="d"))
    assert (cifar.iterations, cifar.milestones, cifar.batch_size, cifar.lr, cifar.pad) == (
        2000, (1000, 1500), 128, 0.1, 4)
    fast = run_config("resnet20", Options(compile=True, bf16=True, device="cpu", seed=3))
    assert (fast.compile, fast.bf16, fast.device, fast.seed) == (True, True, "cpu", 3)
    assert fast.channels_last  # the fast path's layout, also on a recipe that leaves it off
    assert run_config("resnet20", Options(data="cifar10", data_dir="d", compile=True)).channels_last


def test_medium_trains_to_the_end_of_a_schedule_with_its_lr_drops():
    options = Options(budget="medium")
    assert options.dataset == "digits" and options.tag == "medium-digits"
    digits = run_config("resnet110", options)
    assert (digits.iterations, digits.milestones, digits.batch_size, digits.lr) == (
        3000, (2000, 2500), 64, 0.1)
    assert digits.warmup_until_error == 0.8  # the paper's warm-up stays for 110 layers
    cifar = run_config("resnet20", Options(budget="medium", data="cifar10", data_dir="d"))
    assert (cifar.iterations, cifar.milestones, cifar.batch_size) == (16000, (8000, 12000), 128)


def test_seeds_are_consecutive_runs_each_named_by_its_seed():
    runs = Options(budget="medium", seed=1, seeds=3).each_seed()
    assert [(o.seed, o.seeds, o.tag) for o in runs] == [
        (1, 1, "medium-digits-seed1"), (2, 1, "medium-digits-seed2"),
        (3, 1, "medium-digits-seed3")]
    assert [o.tag for o in Options(seeds=2).each_seed()] == ["short-digits",
                                                            "short-digits-seed1"]
    for bad in (0, 101, True, 2.5):
        with pytest.raises(ConfigError, match="--seeds must be"):
            Options(seeds=bad)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="budget"):
        Options(budget="long")
    with pytest.raises(ConfigError, match="data"):
        Options(data="mnist")
    with pytest.raises(ConfigError, match="fig7 trains plain20, resnet20; --models resnet32"):
        check_models(("resnet32",), ("plain20", "resnet20"), "fig7")
    assert check_models(None, ("a", "b"), "x") == ("a", "b")
    assert check_models(("b", "b", "a"), ("a", "b"), "x") == ("b", "a")  # one run each


def test_the_seed_is_part_of_the_run_names():
    assert Options(seed=2).tag == "short-digits-seed2" and Options().tag == "short-digits"
