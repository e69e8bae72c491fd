"""--local-steps H: replicas take H plain SGD steps, push the change, and the shards apply it
as an outer step with the recipe's momentum (`downpour.local`). In process, no Ray: with one
replica and H = 1 it is the recipe's SGD; with H = 3 the server follows the closed form of
plain steps plus an outer momentum step; lockstep replicas push once per H steps."""

import pytest
import torch

from distbelief.distributed.downpour import DownpourReplica, LocalClient
from distbelief.distributed.downpour.local import LocalSteps
from distbelief.distributed.downpour.lockstep import LockstepTrainer
from distbelief.distributed.flat import FlatModel, model_vector
from distbelief.engine import Trainer
from distbelief.engine.config import TrainConfig
from distbelief.errors import ConfigError
from support.downpour import digits_config, make_shards


def local_config(**kw):
    # An MLP: a ResNet's BatchNorm makes 12 steps amplify a last-bit difference (the change
    # is base - w, rounded otherwise than torch's step) to 1e-3.
    settings = dict(model="mlp", local_steps=1, milestones=(), weight_decay=5e-4, momentum=0.9,
                    ps_shards=2, staleness_rule="none")
    return digits_config(**{**settings, **kw})


def trained(config, steps: int) -> torch.Tensor:
    """The single-process trainer's parameters (and buffers) after `steps` steps."""
    trainer = Trainer(config.replace(mode="single", local_steps=None, outer_lr=1.0,
                                     staleness_rule="dana+lr"))
    trainer.train_until(steps)
    return model_vector(trainer.model)[0]


def server_after(config, steps: int) -> tuple[torch.Tensor, int, list]:
    """One replica's `steps` steps against in-process shards: (server vector, n_params,
    shards)."""
    trainer = Trainer(config.replace(mode="single", local_steps=None, outer_lr=1.0))
    shards, n = make_shards(config, trainer.data, config.cluster.ps_shards)
    replica = DownpourReplica(0, config, LocalClient(shards), stats=trainer.data.stats)
    replica.run(0, steps)
    return torch.cat([s.w for s in shards]), n, shards


@pytest.mark.parametrize("rule", ["none", "dana"])
def test_one_replica_one_local_step_is_the_recipes_sgd(rule):
    # change = lr (g + wd w); the outer step with momentum at outer lr 1 is torch's SGD with
    # v = lr * buffer. Under dana, with one replica, the fetched look-ahead is torch's
    # Nesterov SGD, weight decay included (taken where the gradient is, on the replica).
    config = local_config(staleness_rule=rule)
    server, n, shards = server_after(config, 12)
    if rule == "dana":
        server = torch.cat([s.pull(source=0)[0] for s in shards])
    reference = trained(config.replace(nesterov=rule == "dana"), 12)
    torch.testing.assert_close(server[:n], reference[:n], rtol=0, atol=1e-6)
    assert [s.version for s in shards] == [12, 12] and [s.steps for s in shards] == [12, 12]


def test_three_local_steps_then_an_outer_momentum_step():
    # Outer lr 1: the first push lands the server on the plain steps' w3; after the second,
    # v = m (w0 - w3) + (w3 - w6), so the server is w6 - m (w0 - w3), w6 the plain path's.
    config = local_config(local_steps=3)
    plain = config.replace(momentum=0.0)
    w0, w3, w6 = (trained(plain, k) for k in (0, 3, 6))
    server, n, shards = server_after(config, 6)
    torch.testing.assert_close(server[:n], (w6 - 0.9 * (w0 - w3))[:n], rtol=0, atol=2e-6)
    assert [s.version for s in shards] == [2, 2] and [s.steps for s in shards] == [6, 6]
    # The outer lr scales the step: half of the first change.
    half, _, _ = server_after(config.replace(outer_lr=0.5), 3)
    torch.testing.assert_close(half[:n], (w0 - 0.5 * (w0 - w3))[:n], rtol=0, atol=2e-6)


class Late:
    """A reply that is there from the third look on (a fetch on its way: a push and the fetch
    that comes back with it share one, looked at once by the push)."""

    def __init__(self, value):
        self.value, self.looks = value, 0

    def done(self) -> bool:
        self.looks += 1
        return self.looks > 2

    def result(self):
        return self.value


class LateClient(LocalClient):
    def fetch(self, source=None):
        return Late(self._pull(source))

    def push(self, *args, **kw):
        return Late(super().push(*args, **kw).result())


def test_a_fetch_arriving_late_waits_for_the_round_and_loses_no_local_step():
    # With overlap a late fetch is installed at a later step boundary, over the parameters
    # the replica computes with; under local steps that would drop the steps since the push.
    config = local_config(local_steps=2, overlap=True, fetch_wait_s=0.0)
    trainer = Trainer(config.replace(mode="single", local_steps=None))
    results = []
    for client in (LocalClient, LateClient):
        shards, n = make_shards(config, trainer.data, 2)
        DownpourReplica(0, config, client(shards), stats=trainer.data.stats).run(0, 8)
        results.append(torch.cat([s.w for s in shards]))
    assert torch.equal(results[1], results[0])


def test_the_local_lr_follows_the_schedule_in_minibatches_over_all_replicas():
    config = local_config(replicas=4, milestones=(40,), lr=0.2, lr_decay=0.1, iterations=80)
    model = torch.nn.Linear(2, 1)
    local = LocalSteps(config, FlatModel(model))
    assert (local.lr_at(9), local.lr_at(10)) == (0.2, pytest.approx(0.02))
    # A step at lr 0.02 with weight decay moves w by lr * (g + wd * w).
    local.started()
    w = model.weight.detach().clone()
    model.weight.grad = torch.ones_like(w)
    model.bias.grad = torch.zeros_like(model.bias)
    local.step(10)
    torch.testing.assert_close(model.weight.detach(), w - 0.02 * (1 + 5e-4 * w))
    change = local.change()
    torch.testing.assert_close(change[:2], (0.02 * (1 + 5e-4 * w)).flatten())
    assert torch.equal(local.change(), torch.zeros(3))  # counted from the last push


def test_lockstep_replicas_push_once_per_round_of_local_steps(tmp_path):
    config = local_config(model="resnet20", local_steps=4, replicas=3, iterations=24, lockstep=True,
                          staleness_rule="dana+lr", overlap=True, log_every=12)
    summary = LockstepTrainer(config, tmp_path / "run").fit()
    assert summary["local_steps"] == 4 and summary["iterations"] == 24
    assert summary["shard_updates"] == [6, 6]  # 24 minibatches in pushes of 4
    assert summary["staleness"] == {0: 2, 1: 2, 2: 8}  # per shard, replicas - 1 after a round
    assert "4 local sgd steps per push" in summary["update_rule"]


@pytest.mark.parametrize("changes", [{"local_steps": 3}, {"local_steps": None, "n_push": 3}])
def test_a_round_cut_short_by_the_end_is_still_pushed(tmp_path, changes):
    # 10 steps per replica in rounds of 3: the tenth is pushed alone at the end (drain), so
    # every minibatch the records count reached the server.
    config = local_config(replicas=2, iterations=20, lockstep=True, log_every=10, **changes)
    trainer = LockstepTrainer(config, tmp_path / "run")
    summary = trainer.fit()
    assert [s.steps for s in trainer.shards] == [20, 20]
    assert summary["shard_updates"] == [8, 8]  # 3 + 3 + 3 + 1 steps per replica


@pytest.mark.parametrize("changes, message", [
    ({"mode": "single", "local_steps": 2}, "--local-steps applies to --mode downpour"),
    ({"mode": "downpour", "local_steps": 2, "n_push": 2}, "leave --n-push and --n-fetch at 1"),
    ({"mode": "downpour", "local_steps": 2, "staleness_rule": "dc"}, "dc and dana-slim"),
    ({"mode": "downpour", "local_steps": 2, "optimizer": "adagrad"}, "--optimizer sgd"),
    ({"mode": "downpour", "outer_lr": 0.5}, "--outer-lr applies with --local-steps"),
    ({"mode": "downpour", "local_steps": 0}, "--local-steps must be positive"),
])
def test_local_steps_refuses_what_it_cannot_do(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().replace(**changes)
