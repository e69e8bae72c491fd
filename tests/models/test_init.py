"""Initialization by name (`models.init`): a part built alone starts as in the whole model."""

import pytest
import torch

from distbelief.distributed.pipeline.partition import partition
from distbelief.models import create_model
from distbelief.models.init import materialize


def _build(name: str, seed: int, device: str = "cpu", **options):
    torch.manual_seed(seed)
    with torch.device(device):
        return create_model(name, **options)


@pytest.mark.parametrize("name,options", [("resnet20", {"zero_init_residual": True}),
                                          ("deep_mlp", {"hidden": 48}),
                                          ("resnet18", {"num_classes": 7})])
def test_a_part_built_alone_on_the_meta_device_equals_that_part_of_the_whole_model(name, options):
    whole = _build(name, 5, **options)
    meta = _build(name, 5, "meta", **options)
    assert meta.init_seed == whole.init_seed
    plan = partition(whole, 3, torch.randn(1, 3, 32, 32))
    for part, empty in zip(plan.parts, plan.modules_of(meta)):
        alone = materialize(empty, part.names, meta.init_seed, meta.init_rule)
        expected, got = part.module.state_dict(), alone.state_dict()
        assert list(got) == list(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_building_draws_one_number_on_any_device_and_the_seed_fixes_every_value():
    torch.manual_seed(1)
    a = create_model("resnet20")
    after_real = torch.rand(3)
    _build("resnet20", 1, "meta")
    assert torch.equal(torch.rand(3), after_real)
    b = _build("resnet20", 1)
    c = _build("resnet20", 2)
    for (key, x), y, z in zip(a.state_dict().items(), b.state_dict().values(),
                              c.state_dict().values()):
        assert torch.equal(x, y), key
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_each_module_has_its_own_draw_and_keeps_it_whatever_else_was_built():
    small, deep = _build("resnet20", 3), _build("resnet32", 3)
    # Two convolutions of the same shape in one block: one seed for all would make them equal.
    assert not torch.equal(small.layer1[0].conv1.weight, small.layer1[0].conv2.weight)
    # ... and the same layer of two blocks (the same name within its unit).
    assert not torch.equal(small.layer1[0].conv1.weight, small.layer1[1].conv1.weight)
    # The same names in a deeper model: the same values (the stem, the first blocks).
    assert torch.equal(small.conv1.weight, deep.conv1.weight)
    assert torch.equal(small.layer2[0].conv2.weight, deep.layer2[0].conv2.weight)


def test_the_resnet_rule_is_he_et_al_with_fresh_batchnorm_and_zeroed_last_bn():
    model = _build("resnet50", 0, zero_init_residual=True)
    conv = model.layer3[0].conv2.weight  # 3x3, 256 -> 256: fan_out 2304
    assert conv.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    block = model.layer1[0]
    assert torch.equal(block.bn3.weight, torch.zeros(256))
    assert torch.equal(block.bn2.weight, torch.ones(64))
    assert torch.equal(block.bn1.running_var, torch.ones(64))
    assert int(block.bn1.num_batches_tracked) == 0
    bound = 1 / model.fc.in_features ** 0.5  # torch's own Linear
    assert 0.9 * bound < model.fc.weight.abs().max().item() <= bound
