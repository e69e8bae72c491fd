"""Synchronous data parallelism without Ray: one rank equals the single-process trainer, two
ranks (real processes, gloo, DistributedDataParallel) equal it with the doubled batch, each
rank loads only its rows, checkpoints are reported with their records, and the hub's events,
stop and divergence."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distbelief.data import build_data
from distbelief.distributed.sync.hub import SyncHub
from distbelief.distributed.sync.worker import SyncWorker
from distbelief.engine import Trainer
from distbelief.recipes import get_recipe

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("torch_as_it_was")


def config(**kw):
    return get_recipe("digits").replace(**{"mode": "sync", "iterations": 12, "log_every": 4,
                                           "eval_every": 6, "checkpoint_every": 12,
                                           "deterministic": True, **kw})


def stats(c):
    return build_data(c, CPU).stats


def single(c):
    torch.set_num_threads(1)
    trainer = Trainer(c.replace(mode="single"))
    trainer.fit()
    return trainer


class Reports(list):
    """A `report` that keeps what it was given (Ray Train's checkpoints, in process)."""

    def __call__(self, iteration, state, records):
        self.append((iteration, state, [r["iteration"] for r in records]))


def test_one_rank_is_the_single_process_trainer():
    c = config()
    trainer = single(c)
    hub, reports = SyncHub(), Reports()
    worker = SyncWorker(c, 0, 1, CPU, stats(c), hub=hub, report=reports)
    worker.run()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(worker.model.state_dict()[name], value, rtol=0, atol=1e-6)
    events = hub.take()
    records = [e["record"] for e in events if e["kind"] == "train"]
    assert [r["iteration"] for r in records] == [4, 8, 12]
    assert records[-1]["loss"] == pytest.approx(trainer.life.last_train["loss"], rel=1e-5)
    states = [(e["iteration"], e["evaluate"], e["checkpoint"]) for e in events
              if e["kind"] == "state"]
    assert states == [(6, True, False), (12, True, True)]
    # The checkpoint kept for restarts: the state handed over, and the records since.
    (iteration, state, logged), = reports
    assert (iteration, logged) == (12, [4, 8, 12]) and state["iteration"] == 12
    torch.testing.assert_close(state["model"]["fc.weight"], trainer.model.fc.weight.detach())


def test_checkpoints_carry_the_runs_records_so_far_across_a_restart():
    c = config(iterations=12, checkpoint_every=5, log_every=2, eval_every=0)
    reports = Reports()
    first = SyncWorker(c.replace(iterations=6), 0, 1, CPU, stats(c), hub=SyncHub(),
                       report=reports)
    first.run()
    second = SyncWorker(c, 0, 1, CPU, stats(c), hub=SyncHub(), report=reports)
    second.load(first.state(), first.records)  # as a restart from the checkpoint at 6
    second.run()
    assert [(i, logged) for i, _, logged in reports] == [
        (5, [2, 4, 5]), (6, [2, 4, 5, 6]), (10, [2, 4, 5, 6, 8, 10]),
        (12, [2, 4, 5, 6, 8, 10, 12])]


def test_a_rank_loads_and_augments_only_its_rows_of_the_global_batch():
    c = config(batch_size=16, pad=2, flip=True)
    whole = next(build_data(c.replace(batch_size=32), CPU).train.batches(3))
    for rank in (0, 1):
        worker = SyncWorker(c, rank, 2, CPU, stats(c))
        x, y = next(worker.data.train.batches(3))
        assert x.shape[0] == 16  # 1/2 of the global batch's input work
        torch.testing.assert_close(x, whole[0][rank * 16:(rank + 1) * 16], rtol=0, atol=0)
        assert torch.equal(y, whole[1][rank * 16:(rank + 1) * 16])


def _rank(rank, world, path, c, stats_, out):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        reports = Reports()
        worker = SyncWorker(c, rank, world, CPU, stats_, hub=SyncHub() if rank == 0 else None,
                            wrap=torch.nn.parallel.DistributedDataParallel,
                            control=dist.new_group(backend="gloo"), report=reports)
        worker.run()
        torch.save({"model": worker.model.state_dict() if rank == 0 else None,
                    "reports": [(i, state is None) for i, state, _ in reports]},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.subprocess  # two real ranks
def test_two_ranks_without_batchnorm_are_one_process_with_the_doubled_batch(tmp_path):
    c = config(model="mlp", batch_size=16, iterations=10)
    s = stats(c)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, tmp_path / "store", c, s, out), nprocs=2, join=True)
    trainer = single(c.replace(batch_size=32))
    rank0, rank1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    # Every rank reports each checkpoint (Ray Train's report is collective); rank 0 with its
    # state, the others without one.
    assert rank0["reports"] == [(10, False)] and rank1["reports"] == [(10, True)]
    trained = rank0["model"]
    for name, value in trainer.model.state_dict().items():
        # Equal up to the order of summation (two half-batch means averaged).
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-6)
    moved = sum(float((trained[k] - v).abs().sum()) for k, v in
                single(c.replace(batch_size=16)).model.state_dict().items())
    assert moved > 1e-3  # the test can tell the doubled batch from one rank's own batch


def test_a_stop_request_ends_with_a_checkpointed_state():
    hub = SyncHub()
    hub.request_stop()
    worker = SyncWorker(config(), 0, 1, CPU, stats(config()), hub=hub)
    worker.run()
    events = hub.take()
    assert worker.iteration == 1
    assert [e["kind"] for e in events] == ["train", "state"] and events[1]["checkpoint"]


def test_a_worker_continues_from_a_state_as_if_never_stopped():
    c = config()
    whole = SyncWorker(c, 0, 1, CPU, stats(c), hub=SyncHub())
    whole.run()
    first = SyncWorker(c.replace(iterations=6), 0, 1, CPU, stats(c), hub=SyncHub())
    first.run()
    second = SyncWorker(c, 0, 1, CPU, stats(c), hub=SyncHub())
    second.load(first.state())
    second.run()
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_a_diverged_loss_is_reported_and_stops_the_worker():
    hub = SyncHub()
    worker = SyncWorker(config(lr=1e6, momentum=0.0), 0, 1, CPU, stats(config()), hub=hub)
    worker.run()
    kinds = [e["kind"] for e in hub.take()]
    assert kinds[-1] == "diverged" and worker.iteration < 12


def test_the_hub_hands_over_events_in_order_and_keeps_a_stop_request():
    hub = SyncHub()
    hub.joined(0, 100)
    hub.joined(1, 101)
    hub.put({"kind": "attempt", "iteration": 0, "records": []})
    hub.put({"kind": "train", "record": {"iteration": 4}})
    assert [e["kind"] for e in hub.take()] == ["attempt", "train"]
    assert hub.take() == []
    hub.joined(1, 201)  # a restarted worker
    assert not hub.stop_requested()
    hub.request_stop()
    assert hub.stop_requested()
    assert hub.status() == {"workers": {0: 100, 1: 201}, "events": 0}
