"""Downpour with one replica and no overlap is plain SGD: it equals the single-process trainer
(to 1e-6), in-process on 1-3 shards and through real Ray actors. Under staleness rule
`momentum`, which is the recipe's momentum without staleness; the default rule, dana, is
Nesterov's momentum with one replica (tests/distributed/downpour/test_rules.py)."""

import pytest
import torch

from distbelief.distributed import DownpourTrainer
from distbelief.distributed.downpour import DownpourReplica, LocalClient
from distbelief.distributed.flat import model_vector
from distbelief.engine import Trainer, load_checkpoint
from distbelief.recipes import get_recipe
from support.downpour import digits_config, make_shards


@pytest.mark.parametrize("optimizer,lr,shards", [("sgd", 0.05, 1), ("sgd", 0.05, 3),
                                                  ("adagrad", 0.02, 2)])
def test_one_replica_equals_the_single_process_trainer(optimizer, lr, shards):
    config = digits_config(optimizer=optimizer, lr=lr, ps_shards=shards, weight_decay=5e-4,
                           staleness_rule="momentum")
    trainer = Trainer(config.replace(mode="single"))
    reference_start, _ = model_vector(trainer.model)
    trainer.train_until(25)
    reference, n_params = model_vector(trainer.model)

    servers, n = make_shards(config, trainer.data, shards)
    assert torch.equal(torch.cat([s.w for s in servers]), reference_start)
    replica = DownpourReplica(0, config, LocalClient(servers), stats=trainer.data.stats)
    replica.run(0, 10)
    replica.run(10, 15)  # chunks do not change the result
    server = torch.cat([s.w for s in servers])
    torch.testing.assert_close(server[:n], reference[:n], rtol=0, atol=1e-6)
    # BatchNorm statistics: the server's running average equals the trainer's.
    torch.testing.assert_close(server[n:], reference[n:], rtol=1e-6, atol=1e-6)
    assert [s.steps for s in servers] == [25] * shards


def parity_config(**kw):
    settings = dict(recipe="test", mode="downpour", replicas=1, ps_shards=2, overlap=False,
                    iterations=25, batch_size=32, milestones=(12,), lr=0.05, device="cpu",
                    deterministic=True, channels_last=False, log_every=5, eval_every=0,
                    checkpoint_every=0, staleness_rule="momentum")
    return get_recipe("digits").replace(**{**settings, **kw})


# Adagrad through Ray: make test-all. make test runs SGD through Ray, and Adagrad in process
# (above) with the same shards.
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05),
                                          pytest.param("adagrad", 0.02, marks=pytest.mark.slow)])
def test_one_replica_through_ray_equals_the_trainer(ray_cluster, tmp_path, optimizer, lr):
    config = parity_config(optimizer=optimizer, lr=lr)
    summary = DownpourTrainer(config, tmp_path / "run").fit()
    assert summary["iterations"] == 25 and summary["shard_updates"] == [25, 25]
    assert summary["staleness"] == {0: 50}  # one replica, no overlap: never stale
    trainer = Trainer(config.replace(mode="single"))
    trainer.train_until(25)
    server = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(server[name], value, rtol=1e-6, atol=1e-6, msg=name)
