"""The partitioner: every parameter in exactly one part, contiguous, balanced within the stated
bound, and the parts in order compute the model."""

import pytest
import torch
from torch import nn

from distbelief.distributed.pipeline.partition import (ACTIVATION_COST, linear_partition,
                                                       partition, split_table, unit_profile,
                                                       units)
from distbelief.errors import ConfigError
from distbelief.models import create_model


def brute_force(costs, parts):
    """The smallest largest run over every way of cutting (small inputs only)."""
    from itertools import combinations

    best = None
    for cuts in combinations(range(1, len(costs)), parts - 1):
        edges = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs,parts", [([5, 1, 1, 1, 5], 2), ([1, 2, 3, 4, 5, 6], 3),
                                         ([9, 1, 1, 1, 1, 1, 1, 9], 4), ([3, 3, 3], 3)])
def test_linear_partition_is_optimal(costs, parts):
    starts = linear_partition(costs, parts)
    edges = [0, *starts, len(costs)]
    assert len(edges) == parts + 1 and all(a < b for a, b in zip(edges, edges[1:]))
    assert max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])) == brute_force(costs, parts)


@pytest.mark.parametrize("name,parts", [("resnet20", 2), ("resnet20", 3), ("resnet56", 4),
                                        ("resnet18", 4), ("plain20", 5)])
def test_every_parameter_in_exactly_one_contiguous_part(name, parts):
    model = create_model(name, num_classes=10)
    size = 32 if name != "resnet18" else 64
    plan = partition(model, parts, torch.zeros(1, 3, size, size))
    assert len(plan.parts) == parts
    whole = [id(p) for p in model.parameters()]
    cut = [id(p) for part in plan.parts for p in part.module.parameters()]
    assert cut == whole  # each exactly once, in the model's order
    offsets = [part.offset for part in plan.parts]
    assert offsets == [sum(pt.n_tensors for pt in plan.parts[:i]) for i in range(parts)]
    assert sum(p.params for p in plan.parts) == sum(p.numel() for p in model.parameters())
    # Balanced: no part above the mean part plus the costliest unit.
    costs = [p.macs + ACTIVATION_COST * p.kept for p in plan.parts]
    assert max(c + len(p.names) for c, p in zip(costs, plan.parts)) <= plan.bound
    assert sum(costs) == sum(plan.unit_costs)


def test_parts_in_order_compute_the_model():
    model = create_model("resnet20", num_classes=10).eval()
    plan = partition(model, 3, torch.zeros(1, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    y = x
    for part in plan.parts:
        y = part.module(y)
    assert torch.equal(y, model(x))
    assert plan.parts[0].names[0] == "stem" and plan.parts[-1].names[-1] == "head"


def test_units_of_a_resnet_are_stem_blocks_head():
    names = [n for n, _ in units(create_model("resnet20"))]
    assert names == ["stem", *[f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)], "head"]


def test_a_model_that_is_one_unit_cannot_be_cut():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ConfigError, match="one unit"):
        partition(Net(), 2, torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="4 units"):
        partition(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()), 5,
                  torch.zeros(1, 4))


def test_balance_follows_the_multiply_adds():
    # One big layer and three small ones: the big one gets a part to itself.
    model = nn.Sequential(nn.Linear(64, 512), nn.Linear(512, 8), nn.Linear(8, 8),
                          nn.Linear(8, 8))
    plan = partition(model, 2, torch.zeros(1, 64))
    assert [p.names for p in plan.parts] == [["0"], ["1", "2", "3"]]


def test_split_table_is_measured_on_the_meta_device():
    rows = split_table("resnet152", 4)
    assert [r["partition"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["params"] for r in rows) == 60_192_808  # torchvision's resnet152
    assert [r["state_bytes"] for r in rows] == [12 * r["params"] for r in rows]
    costs = [r["macs"] + ACTIVATION_COST * r["activation_bytes_per_example"] // 4 for r in rows]
    assert max(costs) / (sum(costs) / 4) < 1.1  # 50 blocks: a fine enough grain to balance


def test_the_cost_counts_the_elements_kept_for_backward():
    # Linear(4, 8) keeps its input (4), Tanh its output (8), Linear(8, 2) its input (the same
    # tensor, counted by each layer that keeps it: 8); weights are not activations.
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert unit_profile(units(model), torch.zeros(1, 4)) == [(32, 4), (0, 8), (16, 8)]
    plan = partition(model, 2, torch.zeros(1, 4))
    assert [p.kept for p in plan.parts] == [12, 8]
    assert plan.unit_costs == [32 + 4 * ACTIVATION_COST, 8 * ACTIVATION_COST,
                               16 + 8 * ACTIVATION_COST]


def test_a_resnets_wide_activations_weigh_in_the_cut():
    # ResNet-20's 16-channel blocks at 32x32 have the multiply-adds of its 32-channel blocks
    # at 16x16 and twice their activations: by multiply-adds alone the first part would take
    # layer2.0 as well; its step took 1.4x the second part's (docs/benchmarks.md).
    plan = partition(create_model("resnet20", num_classes=10), 2, torch.zeros(1, 3, 32, 32))
    assert [p.describe() for p in plan.parts] == ["stem .. layer1.2", "layer2.0 .. head"]
    first, second = plan.parts
    assert first.macs < second.macs and first.kept > second.kept


def test_a_module_used_twice_is_a_unit_each_time():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 2))
    assert [n for n, _ in units(model)] == ["0", "1", "2", "3", "4"]
    plan = partition(model, 3, torch.zeros(1, 4))
    x = torch.randn(5, 4)
    y = x
    for part in plan.parts:
        y = part.module(y)
    assert torch.equal(y, model(x))


def test_a_parameter_shared_by_two_parts_is_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), shared)
    with pytest.raises(ConfigError, match="shared by two partitions"):
        partition(model, 3, torch.zeros(1, 4))


def test_a_cut_where_the_user_says():
    model = create_model("resnet20")
    sample = torch.zeros(1, 3, 32, 32)
    plan = partition(model, 2, sample, at="layer2.1")
    assert plan.bounds == [0, 5, 11]
    assert [p.describe() for p in plan.parts] == ["stem .. layer2.0", "layer2.1 .. head"]
    assert partition(model, 2, sample).bounds == [0, 4, 11]  # the balanced cut is elsewhere
    plan = partition(model, 3, sample, at=" layer1.1, layer3.0 ")
    assert [p.names[0] for p in plan.parts] == ["stem", "layer1.1", "layer3.0"]
    # The parts are still a run of the model's parameters each.
    assert sum(p.params for p in plan.parts) == sum(t.numel() for t in model.parameters())
    assert [p.offset for p in plan.parts] == [0, plan.parts[0].n_tensors,
                                              plan.parts[0].n_tensors + plan.parts[1].n_tensors]


@pytest.mark.parametrize("parts,at,message", [
    (2, "layer2.1,layer3.0", "names 2 unit(s): 2 partitions begin at 1"),
    (2, "layer9", "no unit 'layer9' in the model (its units: stem, layer1.0"),
    (3, "layer3.0,layer2.0", "not in the model's order"),
    (2, "stem", "after its first unit (stem)"),
    (3, "layer2.0,layer2.0", "not in the model's order"),
])
def test_a_cut_that_is_no_cut_is_refused(parts, at, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        partition(create_model("resnet20"), parts, torch.zeros(1, 3, 32, 32), at=at)


def test_split_table_shows_the_users_cut():
    rows = split_table("resnet20", 2, at="layer2.1")
    assert [r["units"] for r in rows] == ["stem .. layer2.0", "layer2.1 .. head"]
