"""The sync trainer's side of the events, without Ray: what it logs, drops and counts when the
workers start, restart from Ray Train's checkpoint, or a restarted hub re-sends events."""

import pytest
import torch

from distbelief.distributed.sync.trainer import SyncTrainer
from distbelief.engine.rundir import read_jsonl
from distbelief.recipes import get_recipe


def train(i):
    return {"kind": "train", "record": {"kind": "train", "iteration": i, "loss": 1.0 / i}}


def state(trainer, i, checkpoint=True):
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return {"kind": "state", "iteration": i, "evaluate": False, "checkpoint": checkpoint,
            "state": {"iteration": i, "model": model, "optimizer": {}, "schedule": {},
                      "train_s": float(i)}}


def attempt(i, records=()):
    return {"kind": "attempt", "iteration": i, "records": [train(r)["record"] for r in records]}


@pytest.fixture
def trainer(tmp_path):
    t = SyncTrainer(get_recipe("digits").replace(mode="sync", replicas=2, iterations=100),
                    tmp_path / "run")
    t.life.begin(t)
    return t


def logged(trainer, kind="train"):
    return [r["iteration"] for r in read_jsonl(trainer.life.run.path / "metrics.jsonl")
            if r["kind"] == kind]


def test_events_in_order_are_logged_and_checkpointed(trainer):
    trainer._handle([attempt(0), train(10), train(20), state(trainer, 20)])
    assert logged(trainer) == [10, 20] and trainer.iteration == 20
    saved = torch.load(trainer.life.run.checkpoint, weights_only=False)
    assert saved["iteration"] == 20 and saved["train_storage"] == trainer.storage
    assert trainer.storage.endswith("run/ray-train")
    assert trainer.life.counters["worker_failures"] == 0


def test_resent_events_behind_the_driver_are_dropped_not_logged_twice(trainer):
    trainer._handle([attempt(0), train(10), train(30), train(20), train(30),
                     state(trainer, 30), state(trainer, 30), state(trainer, 20)])
    assert logged(trainer) == [10, 30]
    assert trainer.summary()["hub_events_dropped"] == 4


def test_a_restart_drops_the_records_after_its_checkpoint_and_counts_a_failure(trainer):
    trainer._handle([attempt(0), train(10), train(20), state(trainer, 20), train(30)])
    trainer._handle([attempt(20, [10, 20]), train(30), train(40)])
    assert logged(trainer) == [10, 20, 30, 40]
    assert logged(trainer, "failure") == [20]
    counters = trainer.life.counters
    assert (counters["worker_failures"], counters["steps_lost"]) == (1, 10)


def test_a_checkpoint_the_driver_never_heard_of_brings_the_records_it_missed(trainer):
    trainer._handle([attempt(0), train(10)])
    # The driver was killed (or the hub lost its events) after 10; Ray Train's checkpoint at
    # 40 holds the run's records.
    trainer._handle([attempt(40, [10, 20, 30, 40]), train(50)])
    assert logged(trainer) == [10, 20, 30, 40, 50]
    assert trainer.life.counters["worker_failures"] == 1  # the second start of the workers
    assert trainer.life.counters["steps_lost"] == 0
