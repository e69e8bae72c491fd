"""BatchNorm running statistics under Downpour (--bn-stats): the shard's moving average of all
replicas' batches, without delayed feedback; and precise BN (--bn-recalibrate)."""

import pytest
import torch

from distbelief.distributed.downpour import DownpourReplica, LocalClient, ParameterShard
from distbelief.distributed.downpour.statistics import buffer_retention
from distbelief.engine.config import TrainConfig
from distbelief.engine.evaluate import recalibrate
from support.downpour import digits_config, make_shards


def test_retention_is_one_minus_momentum_for_moving_statistics_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, momentum=0.2),
                                torch.nn.BatchNorm1d(3, momentum=None))
    expected = [0.8, 0.8, 0.8, 0.8, 1.0] + [1.0] * 7  # mean, var, count; cumulative: all 1
    torch.testing.assert_close(buffer_retention(model), torch.tensor(expected))


def _lockstep_statistics(bn_stats, replicas=3, rounds=4, n_push=1):
    """Replicas of ResNet-20 at lr 1e-12 (weights fixed: batch statistics depend on the
    batches alone) in round robin against in-process shards, fetching every step and pushing
    every `n_push`; returns (server buffers, the buffers of one model run over the same
    batches in the order their pushes arrived)."""
    from distbelief.data import build_data
    from distbelief.distributed.downpour.replica import initial_model

    config = digits_config(lr=1e-12, momentum=0.0, replicas=replicas, overlap=True,
                           bn_stats=bn_stats, ps_shards=2, n_push=n_push)
    data = build_data(config, torch.device("cpu"))
    shards, n = make_shards(config, data, 2)
    client = LocalClient(shards)
    reps = [DownpourReplica(r, config, client, stats=data.stats) for r in range(replicas)]
    reference = initial_model(config, data)  # the server's start, buffers included
    reference.train()
    pending = [[] for _ in reps]  # each replica's batches not pushed yet
    for step in range(rounds):
        for r, rep in enumerate(reps):
            rep.run(step, 1)
            pending[r].append(next(rep.data.train.batches(step))[0])
            if (step + 1) % n_push == 0:
                with torch.no_grad():
                    for x in pending[r]:
                        reference(x)
                pending[r] = []
    server = torch.cat([s.w for s in shards])[n:]
    expected = torch.cat([b.reshape(-1).float() for b in reference.buffers()])
    return server, expected


def test_with_replicas_in_lockstep_the_shard_s_statistics_are_the_single_moving_average():
    server, expected = _lockstep_statistics("batch")
    torch.testing.assert_close(server, expected, rtol=1e-4, atol=1e-5)
    # Changes of the replicas' own averages (delta) lag by the staleness: not the same.
    delayed, _ = _lockstep_statistics("delta")
    assert (delayed - expected).abs().max() > 1e-2


def test_a_push_of_several_steps_folds_them_all_and_keeps_them_across_fetches():
    """n_push 2 with a fetch every step: the accumulators survive the fetch in between, and
    the shard folds two batches' worth of decay."""
    server, expected = _lockstep_statistics("batch", replicas=2, n_push=2)
    torch.testing.assert_close(server, expected, rtol=1e-4, atol=1e-5)


def test_the_shard_folds_retention_to_the_power_of_the_forward_passes():
    """A push of 3 steps with 2 micro-batches each: 6 passes of BatchNorm's moving average."""
    c = TrainConfig().replace(partitions=2, micro_batches=2, batch_size=8)
    s = ParameterShard(0, 0, 2, 0, torch.tensor([1.0, 5.0]), c,
                       retention=torch.tensor([0.9, 1.0]))
    s.push(torch.tensor([0.25, 6.0]), 0, steps=3)
    torch.testing.assert_close(s.w, torch.tensor([0.9 ** 6 + 0.25, 11.0]))


def _fold_at_staleness(bn_stats, staleness=30, pushes=600, momentum=0.1):
    """A running mean of true value 1 followed by a shard whose pushes come `staleness`
    versions late, each computed as a replica computes it from the value it fetched."""
    c = TrainConfig().replace(bn_stats=bn_stats, replicas=staleness + 1)
    s = ParameterShard(0, 0, 1, 0, torch.zeros(1), c, retention=torch.tensor([1 - momentum]))
    fetched = [s.pull()[0].clone() for _ in range(staleness + 1)]
    for k in range(pushes):
        r = k % (staleness + 1)
        if bn_stats == "batch":
            pushed = torch.tensor([momentum * 1.0])  # its moving average from zero
        else:
            pushed = momentum * (1.0 - fetched[r])  # (1-a) r_fetched + a mu - r_fetched
        s.push(pushed, s.version - staleness)
        fetched[r] = s.pull()[0].clone()
    return float(s.w)


def test_batch_statistics_stay_finite_where_delayed_feedback_diverges():
    assert _fold_at_staleness("batch") == pytest.approx(1.0, abs=1e-4)
    assert abs(_fold_at_staleness("delta")) > 1e3  # a = 0.1 is unstable past staleness ~15


def test_recalibrate_is_the_plain_average_of_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    model[1].num_batches_tracked.fill_(7)
    model.eval()
    batches = [(torch.randn(4, 2, 5, 5) * (k + 1) + k, None) for k in range(5)]
    assert recalibrate(model, iter(batches), 3) == 1
    with torch.no_grad():
        outs = [model[0](x) for x, _ in batches[:3]]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(3, -1).var(1) for o in outs]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 7 and not model.training


def test_the_servers_retention_gives_every_run_without_holding_the_parameters_ones():
    from torch import nn

    from distbelief.distributed.downpour.statistics import server_retention
    from distbelief.distributed.flat import BlockFlat, FlatModel

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    parts = [nn.Sequential(model[0], model[1]), nn.Sequential(model[2], model[3])]
    for flat in (FlatModel(model), BlockFlat(parts)):
        retention = server_retention(flat)
        full = torch.cat([torch.cat([torch.ones(b.n_params), buffer_retention(b.model)])
                          for b in getattr(flat, "blocks", [flat])])
        assert len(retention) == len(full) and (full < 1).any()
        for lo in range(len(full) + 1):
            for hi in range(lo, len(full) + 1):
                assert torch.equal(retention[lo:hi], full[lo:hi]), (lo, hi)
        held = sum(len(values) for _, _, values in retention.runs if values is not None)
        assert held == flat.n_buffers  # no vector of the parameters' ones
