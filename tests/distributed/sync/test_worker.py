"""Synchronous data parallelism without Ray: one rank equals the single-process trainer, two
ranks (real processes, gloo, DistributedDataParallel) equal it with the doubled batch, and the
hub's events, stop and divergence."""

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


def test_one_rank_is_the_single_process_trainer():
    c = config()
    trainer = single(c)
    hub = SyncHub()
    worker = SyncWorker(c, 0, 1, CPU, stats(c), hub=hub)
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
    assert hub.latest["iteration"] == 12  # the checkpointed state, for a restart


def _rank(rank, world, path, c, stats_, out):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        worker = SyncWorker(c, rank, world, CPU, stats_, hub=SyncHub() if rank == 0 else None,
                            wrap=torch.nn.parallel.DistributedDataParallel,
                            control=dist.new_group(backend="gloo"))
        worker.run()
        if rank == 0:
            torch.save(worker.model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_without_batchnorm_are_one_process_with_the_doubled_batch(tmp_path):
    c = config(model="mlp", batch_size=16, iterations=10)
    s = stats(c)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, tmp_path / "store", c, s, out), nprocs=2, join=True)
    trainer = single(c.replace(batch_size=32))
    trained = torch.load(out)
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


def test_the_hub_counts_attempts_and_hands_out_the_last_checkpoint():
    hub = SyncHub()
    assert hub.join(0, 100) is None and hub.join(1, 101) is None
    hub.put({"kind": "state", "iteration": 5, "state": {"iteration": 5}, "evaluate": True,
             "checkpoint": False})
    assert hub.latest is None  # an evaluation only: not a state to restart from
    hub.put({"kind": "state", "iteration": 8, "state": {"iteration": 8}, "evaluate": False,
             "checkpoint": True})
    assert hub.join(0, 200) == {"iteration": 8}
    events = hub.take()
    assert [e["kind"] for e in events] == ["attempt", "state", "state", "attempt"]
    assert events[-1] == {"kind": "attempt", "attempt": 2, "iteration": 8}
    assert hub.status() == {"attempts": 2, "workers": {0: 200, 1: 101}, "latest": 8}
    assert hub.take() == []
