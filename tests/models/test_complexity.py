"""Parameter and multiply-add counts against the paper's figures (../shared/PAPERS.md)."""

import pytest
import torch
import torchvision

from distbelief.models import count_macs, count_params, create_model, list_models, summarize

# Table 6: parameters as the paper rounds them.
CIFAR_PARAMS = {"resnet20": "0.27M", "resnet32": "0.46M", "resnet44": "0.66M",
                "resnet56": "0.85M", "resnet110": "1.7M", "resnet1202": "19.4M"}

# Table 1: multiply-adds of the paper's variant (stride on the bottleneck's first 1x1 conv).
IMAGENET_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6,
                  "resnet152": 11.3}


@pytest.mark.parametrize("name, paper", CIFAR_PARAMS.items())
def test_cifar_params_round_to_table_6(name, paper):
    params = summarize(name)["params"]
    digits = len(paper.split(".")[1]) - 1  # "0.27M" -> 2 decimals, "1.7M" -> 1
    assert f"{params / 1e6:.{digits}f}M" == paper


@pytest.mark.parametrize("name", IMAGENET_GMACS)
def test_imagenet_params_equal_torchvision(name):
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)()
    assert summarize(name)["params"] == count_params(reference)


@pytest.mark.parametrize("name, gmacs", IMAGENET_GMACS.items())
def test_imagenet_macs_within_3_percent_of_table_1(name, gmacs):
    assert summarize(name)["macs"] / 1e9 == pytest.approx(gmacs, rel=0.03)


def test_v15_variant_costs_more_as_torchvision_reports():
    # torchvision documents 4.09 GFLOPS (multiply-adds) for its ResNet-50.
    assert summarize("resnet50", variant="v1.5")["macs"] / 1e9 == pytest.approx(4.09, abs=0.01)


def test_macs_count_real_work():
    """A hand count for the smallest case: ResNet-20 on 32x32 is 40.55M multiply-adds."""
    stem = 32 * 32 * 16 * 3 * 9
    stage1 = 6 * 32 * 32 * 16 * 16 * 9
    stage2 = 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9
    stage3 = 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9
    fc = 64 * 10
    model = create_model("resnet20")
    assert count_macs(model, 32) == stem + stage1 + stage2 + stage3 + fc
    # Cost grows with the pixels: a 64x64 input costs about 4x.
    assert count_macs(model, 64) == pytest.approx(4 * count_macs(model, 32), rel=0.001)


def test_summary_rows_have_the_documented_keys():
    for name in list_models():
        row = summarize(name)
        assert {"name", "family", "depth", "residual", "params", "macs", "input_size"} <= row.keys()
        assert row["input_size"] == {"cifar": 32, "imagenet": 224, "dense": 32}[row["family"]]


def test_a_summary_row_is_the_callers_to_change():
    row = summarize("resnet20")
    row["params"] = -1  # a caller's edit never reaches the next caller (rows are kept)
    assert summarize("resnet20")["params"] == 269_722


def test_count_macs_leaves_a_training_model_untouched():
    model = create_model("resnet20")
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, 32)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
