"""Cutting a flat vector into the shards' slices."""

import pytest

from distbelief.optim import shard_bounds


@pytest.mark.parametrize("total,shards", [(10, 1), (10, 3), (7, 7), (1_000_003, 4)])
def test_shard_bounds_cover_disjoint_and_balanced(total, shards):
    bounds = shard_bounds(total, shards)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_bounds_refuses_more_shards_than_elements():
    with pytest.raises(ValueError):
        shard_bounds(3, 4)
