"""SandblasterReplica without Ray: its verdict and push protocol."""

import pytest
import torch

from distbelief.distributed.sandblaster import LocalShards
from distbelief.distributed.sandblaster.replica import SandblasterReplica
from distbelief.engine.config import TrainConfig


@pytest.fixture(scope="module")
def replica_setup():
    config = TrainConfig().replace(model="softmax", data="digits", mode="sandblaster",
                                   batch_size=0, portions=6, push_every=2, device="cpu")
    store = LocalShards(650, 2)  # softmax on 8x8 digits: 64 * 10 + 10 parameters
    replica = SandblasterReplica(0, config, store)
    return config, store, replica


def _new_round(store, round_):
    store.run([("set", "x", torch.zeros(650)), ("round", round_, "x")])


def test_replica_pushes_only_winners_once_every_push_every(replica_setup):
    _, store, replica = replica_setup
    _new_round(store, 1)
    grads = {}
    verdict = None
    for p, win in [(0, True), (1, False), (2, True), (3, True)]:
        replica.compute(1, 0, p, False, verdict)
        grads[p] = replica.pending[2].clone()
        verdict = (1, p, win)
    # Portions 0 and 2 won and were pushed together; 3's verdict is still on its way.
    assert store.shards[0].held == {0, 2}
    out = replica.flush(1, verdict)
    assert sorted(out["pushed"]) == [0, 2, 3]
    assert store.shards[1].held == {0, 2, 3}
    assert torch.allclose(store.read("acc"), grads[0] + grads[2] + grads[3])
    # The same verdict again (the compute call and the flush both carry it): applied once.
    replica.flush(1, verdict)
    assert torch.allclose(store.read("acc"), grads[0] + grads[2] + grads[3])


def test_a_late_result_of_an_old_round_is_never_pushed(replica_setup):
    _, store, replica = replica_setup
    _new_round(store, 2)
    replica.compute(2, 0, 4, False, None)
    _new_round(store, 3)  # the round ended without this copy
    replica.compute(3, 0, 5, True, (2, 4, False))
    replica.flush(3, (3, 5, True))
    assert store.shards[0].held == {5}  # solo push of a recomputed portion
    assert store.shards[0].counts["stale"] == 0
