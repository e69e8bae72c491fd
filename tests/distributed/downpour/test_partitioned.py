"""Downpour with partitioned replicas, in process: shards aligned to the parts, the server's
block layout, and one partitioned replica without overlap equal to plain SGD."""

import pytest
import torch
from torch import nn

from distbelief.data import BatchCursor, build_data
from distbelief.distributed.downpour import DownpourReplica, LocalClient, ParameterShard
from distbelief.distributed.downpour.bound import ReplicaClocks, StalenessBound
from distbelief.distributed.downpour.layout import aligned_shards, server_layout, start_values
from distbelief.distributed.downpour.statistics import buffer_slice
from distbelief.distributed.downpour.partitioned import PartitionedReplica, ServerStage
from distbelief.distributed.flat import BlockFlat, FlatModel
from distbelief.distributed.pipeline.relay import ThreadedStages
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import build_model
from distbelief.errors import ConfigError
from support.downpour import TableClient, digits_config, make_shards


@pytest.mark.parametrize("blocks,shards", [
    ([(100, 10), (300, 0)], 2), ([(100, 10), (300, 0)], 5),
    ([(5, 0), (0, 0), (50, 4), (1, 0)], 4), ([(1, 0), (10, 0)], 8)])
def test_shards_are_aligned_to_parts(blocks, shards):
    slots = aligned_shards(blocks, shards)
    assert len(slots) == shards
    sizes = [p + b for p, b in blocks]
    edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    covered = []
    for s in slots:
        assert edges[s.part] <= s.lo < s.hi <= edges[s.part + 1]  # never straddles two parts
        assert s.param_end == edges[s.part] + blocks[s.part][0]
        covered.extend(range(s.lo, s.hi))
    assert covered == list(range(edges[-1]))  # every value on exactly one shard, in order
    assert {s.part for s in slots} == {i for i, size in enumerate(sizes) if size}


def test_fewer_shards_than_parts_is_one_clear_error():
    with pytest.raises(ConfigError, match="--ps-shards 1 is below the 2 partitions"):
        aligned_shards([(10, 0), (10, 0)], 1)


@pytest.mark.parametrize("parts,shards", [(2, 2), (3, 7)])
def test_each_shard_computes_its_start_from_its_part_alone_as_the_whole_model_starts(parts,
                                                                                     shards):
    from distbelief.distributed.downpour.layout import PartSlice
    from distbelief.distributed.downpour.replica import initial_model

    config = digits_config(partitions=parts, ps_shards=shards, seed=9)
    data = build_data(config, torch.device("cpu"))
    starts, plan, slots, _ = server_layout(config, data)
    assert all(isinstance(start, PartSlice) for start in starts)  # no values on the driver
    assert all(not t.numel() or t.is_meta for part in plan.parts
               for t in part.module.state_dict().values())
    whole = BlockFlat(plan.modules_of(initial_model(config, data))).vector()
    for start, slot in zip(starts, slots):
        assert torch.equal(torch.from_numpy(start_values(start)), whole[slot.lo:slot.hi])
    # The run's seed reaches the shards.
    assert not torch.equal(torch.from_numpy(start_values(starts[0])),
                           torch.from_numpy(start_values(server_layout(
                               config.replace(seed=10), data)[0][0])))


def test_block_layout_round_trips():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    parts = [nn.Sequential(model[0], model[1]), nn.Sequential(model[2])]
    flat = BlockFlat(parts)
    first = FlatModel(parts[0])
    vector = flat.vector()
    assert torch.equal(vector[:first.n_params], torch.cat([p.reshape(-1) for p in
                                                          parts[0].parameters()]))
    assert flat.sizes == [first.n_params + first.n_buffers, 10]
    flat.load(torch.arange(vector.numel(), dtype=torch.float32))
    assert torch.equal(flat.vector(), torch.arange(vector.numel(), dtype=torch.float32))


def local_partitioned(config, data, handoff="driver"):
    """One partitioned replica over in-process stages and aligned in-process shards (with
    `handoff` "direct": stages on threads of their own, handing on to each other)."""
    starts, plan, slots, retention = server_layout(config, data)
    shards = [ParameterShard(k, s.lo, s.hi, s.param_end,
                             torch.from_numpy(start_values(starts[k])), config,
                             retention=buffer_slice(retention, s.lo, s.hi, s.param_end))
              for k, s in enumerate(slots)]
    with torch.device("meta"):
        modules = plan.modules_of(build_model(config, data))
    offsets = [min(s.lo for s in slots if s.part == p) for p in range(len(modules))]
    stages = [ServerStage(p, len(modules), m, get_loss("cross_entropy"), config,
                          LocalClient([sh for sh, s in zip(shards, slots) if s.part == p],
                                      offsets[p]), replica=0)
              for p, m in enumerate(modules)]
    if handoff == "direct":
        threaded = ThreadedStages(stages)
        return PartitionedReplica(0, config, threaded.call, threaded.resolve, len(stages),
                                  stats=data.stats, handoff="direct",
                                  watch=threaded.watch), shards, stages
    call = lambda p, method, *args: getattr(stages[p], method)(*args)  # noqa: E731
    return PartitionedReplica(0, config, call, list, len(stages), stats=data.stats), shards, \
        stages


@pytest.mark.parametrize("parts,channels_last", [(2, False), (3, True)])
def test_one_partitioned_replica_equals_one_whole_replica(parts, channels_last):
    # Channels-last: the gradients (views of the pushed vector) stay in the server's order.
    config = digits_config(partitions=parts, ps_shards=parts + 1, channels_last=channels_last)
    data = build_data(config, torch.device("cpu"))
    replica, shards, stages = local_partitioned(config, data)
    metrics = replica.run(0, 8)
    assert metrics["steps"] == 8 and metrics["pushes"] == 8 * parts
    assert len(metrics["partitions"]) == parts
    whole_config = config.replace(partitions=1, ps_shards=1)
    whole_shards, _ = make_shards(whole_config, data, 1)
    whole = DownpourReplica(0, whole_config, LocalClient(whole_shards), stats=data.stats)
    whole.run(0, 8)
    # The same model, laid out part by part: compare through the driver's view of each.
    server = torch.cat([s.w for s in shards])
    reference = build_model(config, data)
    FlatModel(reference).load(whole_shards[0].w)
    _, plan, _, _ = server_layout(config, data)
    torch.testing.assert_close(server, BlockFlat(plan.modules_of(reference)).vector(),
                               rtol=0, atol=1e-6)
    assert all(s.version == 8 for s in shards)
    # A partition holds only its own part.
    assert [sum(p.numel() for p in st.module.parameters()) for st in stages] == \
        [p.params for p in plan.parts]


@pytest.mark.parametrize("handoff", ["driver", "direct"])
def test_a_failed_chunk_leaves_nothing_behind(handoff):
    config = digits_config(partitions=2, ps_shards=2, n_push=2)
    data = build_data(config, torch.device("cpu"))
    replica, shards, stages = local_partitioned(config, data, handoff)
    replica.run(0, 3)  # pushes after step 1; step 2's gradient waits for the next push
    assert all(s.exchange.accum is not None for s in stages)

    def died(*args):
        raise RuntimeError("partition died")

    stages[1].forward_loss = died
    with pytest.raises(RuntimeError, match="died"):
        replica.run(3, 2)
    assert stages[0].saved  # its forward ran: activations left behind
    del stages[1].forward_loss
    with pytest.raises(RuntimeError, match="died"):  # a chunk queued before the driver knew
        replica.run(3, 2)
    replica.recover()
    assert all(s.exchange.accum is None and not s.saved for s in stages)
    versions = [s.version for s in shards]
    # Step 3 trained again: its push holds it alone (step 2's gradient went with the failure).
    assert replica.run(3, 2)["pushes"] == 2
    assert [s.version for s in shards] == [v + 1 for v in versions]


def whole_run(config, data, steps):
    """The server vector one whole (unpartitioned) replica leaves after `steps`, laid out as
    the partitioned server is (part by part)."""
    whole_config = config.replace(partitions=1, ps_shards=1, micro_batches=1)
    whole_shards, _ = make_shards(whole_config, data, 1)
    DownpourReplica(0, whole_config, LocalClient(whole_shards), stats=data.stats).run(0, steps)
    reference = build_model(config, data)
    FlatModel(reference).load(whole_shards[0].w)
    _, plan, _, _ = server_layout(config, data)
    return BlockFlat(plan.modules_of(reference)).vector()


@pytest.mark.parametrize("n_push,micro,schedule,handoff", [
    (2, 1, "1f1b", "driver"), (3, 1, "1f1b", "driver"), (2, 4, "1f1b", "driver"),
    (3, 4, "gpipe", "driver"), (2, 4, "1f1b", "direct"), (3, 4, "gpipe", "direct")])
def test_accumulated_pushes_and_micro_batches_equal_one_whole_replica(n_push, micro, schedule,
                                                                      handoff):
    # Each partition adds n_push steps' gradients before it pushes: a gradient kept without
    # its copy (the next step's backward writes into it) would push n_push x the last one.
    # A BatchNorm-free model, so that M micro-batches compute the whole batch's gradient.
    config = digits_config(model="mlp", partitions=2, ps_shards=2, n_push=n_push,
                           micro_batches=micro, pipeline_schedule=schedule)
    data = build_data(config, torch.device("cpu"))
    replica, shards, _ = local_partitioned(config, data, handoff)
    start = torch.cat([s.w for s in shards]).clone()
    metrics = replica.run(0, 6)
    assert metrics["pushes"] == 2 * (6 // n_push)
    server = torch.cat([s.w for s in shards])
    torch.testing.assert_close(server, whole_run(config, data, 6), rtol=0, atol=1e-6)
    assert (server - start).abs().max() > 1e-3  # it trained


def test_micro_batches_with_batchnorm_are_normalised_each_on_its_own():
    # One step of M = 2 micro-batches: the gradient is the sum of each half's weighted
    # gradient with BatchNorm over that half alone, and the server's running statistics are
    # the model's after the two halves' forward passes, one after the other.
    config = digits_config(partitions=2, ps_shards=2, micro_batches=2, staleness_rule="none",
                           momentum=0.0, weight_decay=0.0)
    data = build_data(config, torch.device("cpu"))
    replica, shards, _ = local_partitioned(config, data)
    w0 = torch.cat([s.w for s in shards]).clone()
    replica.run(0, 1)
    model = build_model(config, data)
    _, plan, _, _ = server_layout(config, data)
    layout = BlockFlat(plan.modules_of(model))
    layout.load(w0)
    x, y = next(BatchCursor(build_data(config, torch.device("cpu"), stats=data.stats,
                                       part=(0, 1)).train).at(0))
    loss = get_loss("cross_entropy")
    model.train()
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        (loss(model(xm), ym) * len(ym) / len(y)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= config.lr * p.grad
    torch.testing.assert_close(torch.cat([s.w for s in shards]), layout.vector(), rtol=0,
                               atol=1e-5)


def test_bfloat16_partitions_train_near_the_float32_ones():
    # Weights, activations and gradients in bfloat16 on the stages, float32 on the shards: the
    # server moves as the float32 run's does, to bfloat16's precision, and not identically.
    config = digits_config(model="mlp", partitions=2, ps_shards=2, n_push=2)
    data = build_data(config, torch.device("cpu"))
    low = config.replace(partition_dtype="bfloat16")
    replica, shards, stages = local_partitioned(low, data)
    start = torch.cat([s.w for s in shards]).clone()
    replica.run(0, 6)
    assert all(p.dtype == torch.bfloat16 for st in stages for p in st.module.parameters())
    assert all(st.gradient.dtype == torch.bfloat16 for st in stages)
    assert all(s.w.dtype == torch.float32 for s in shards)
    server = torch.cat([s.w for s in shards])
    reference, reference_shards, _ = local_partitioned(config, data)
    reference.run(0, 6)
    expected = torch.cat([s.w for s in reference_shards])
    moved = (expected - start).abs().max()
    assert moved > 1e-2
    assert 1e-6 < (server - expected).abs().max() < 0.1 * moved


def test_a_partitioned_replica_waits_before_the_steps_the_ssp_bound_forbids():
    # As a whole replica (test_bound.py): every partition pushes each step it is let through,
    # none the step it waits before, and after the failed chunk what it knew is forgotten.
    config = digits_config(partitions=2, ps_shards=2, ssp_bound=1)
    data = build_data(config, torch.device("cpu"))
    replica, shards, _ = local_partitioned(config, data)
    clocks = ReplicaClocks(1)
    clocks.report(1, 0)  # replica 1 is at work, and never moves
    client = TableClient(clocks)
    replica.bound = StalenessBound(0, 1, client)
    with pytest.raises(AssertionError, match="never end"):
        replica.run(0, 4)
    assert client.reports == [(0, 1), (0, 2), (0, 3)] and client.waits == [(0, 3)]
    assert [s.version for s in shards] == [3, 3]
    replica.recover()
    assert replica.bound.known is None and not replica.bound.reported
