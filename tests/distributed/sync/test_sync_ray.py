"""`--mode sync` on Ray Train, on the module's local Ray of two CPUs: parity of one worker with
the single-process trainer, a stop and --resume continuing from Ray Train's own checkpoint, a
hub that dies mid-run, and a worker killed mid-run."""

import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from distbelief.api import trainer_for
from distbelief.engine import Trainer, TrainingInterrupted
from distbelief.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("ray_cluster", "torch_as_it_was")


def config(**kw):
    return get_recipe("digits").replace(**{"mode": "sync", "replica_cpus": 1, **kw})


def records(run, kind="train"):
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == kind]


# make test-all; in make test one rank equals the trainer without Ray (sync/test_worker.py), and
# two workers train, stop and resume on Ray Train below.
@pytest.mark.slow
def test_one_worker_is_the_single_process_trainer(tmp_path):
    c = config(iterations=12, log_every=4, eval_every=6, deterministic=True)
    summary = trainer_for(c, tmp_path / "sync").fit()
    torch.set_num_threads(1)
    trainer = Trainer(c.replace(mode="single"))
    alone = trainer.fit()
    saved = torch.load(tmp_path / "sync" / "checkpoints" / "last.pt", weights_only=False)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=1e-6)
    assert summary["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    assert summary["global_batch"] == 64 and summary["examples"] == 12 * 64
    assert [r["iteration"] for r in records(tmp_path / "sync")] == [4, 8, 12]
    assert [r["iteration"] for r in records(tmp_path / "sync", "eval")] == [6, 12]


def test_two_workers_stop_on_sigterm_and_resume_from_ray_trains_checkpoint(tmp_path):
    from ray.train import Result

    c = config(replicas=2, iterations=60, log_every=5, eval_every=30, checkpoint_every=10)
    run = tmp_path / "run"
    trainer = trainer_for(c, run)

    def keep_the_first_checkpoint_then_stop():
        last = run / "checkpoints" / "last.pt"
        while not last.is_file():
            time.sleep(0.05)
        shutil.copy(last, run / "at-10.pt")
        while not any(r["iteration"] > 10 for r in records(run)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's scheduler stops a job

    threading.Thread(target=keep_the_first_checkpoint_then_stop, daemon=True).start()
    with pytest.raises(TrainingInterrupted, match="--resume") as stopped_by:
        trainer.fit()
    assert stopped_by.value.signum == signal.SIGTERM
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert 10 < stopped["iteration"] < 60
    kept = Result.from_path(str(run / "ray-train"))  # Ray Train's own record of the run
    assert kept.metrics["iteration"] == stopped["iteration"]
    # Roll the run directory back to the checkpoint at 10, as if the driver had been killed
    # before it wrote the later ones: the workers continue from Ray Train's checkpoint, and the
    # driver writes the records it never heard of from that checkpoint.
    assert torch.load(run / "at-10.pt", weights_only=False)["iteration"] == 10
    shutil.copy(run / "at-10.pt", run / "checkpoints" / "last.pt")
    summary = trainer_for(c, run, resume=True).fit()
    assert summary["iterations"] == 60 and summary["test_accuracy"] > 0.5, summary
    assert summary["worker_failures"] == 0 and summary["steps_lost"] == 0
    iterations = [r["iteration"] for r in records(run)]
    expected = sorted({*range(5, 61, 5), stopped["iteration"]})
    assert iterations == expected, iterations  # each once, none missing


# Half a minute around a kill: make test-all. In make test the trainer's handling of re-sent and
# stale events runs without Ray (sync/test_trainer.py).
@pytest.mark.slow
def test_a_hub_that_dies_is_restarted_and_the_run_goes_on(tmp_path):
    import ray

    c = config(replicas=1, iterations=300, log_every=10, eval_every=0, checkpoint_every=100)
    run = tmp_path / "run"
    trainer = trainer_for(c, run)

    def kill_the_hub():
        while not (run / "metrics.jsonl").is_file() or not records(run):
            time.sleep(0.1)
        ray.kill(ray.get_actor(trainer.hub_name), no_restart=False)

    threading.Thread(target=kill_the_hub, daemon=True).start()
    summary = trainer.fit()
    assert summary["iterations"] == 300 and summary["worker_failures"] == 0, summary
    iterations = [r["iteration"] for r in records(run)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 300
    assert len(iterations) >= 27  # at most the few events in flight when it died are lost


@pytest.mark.slow  # make test-all
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    import ray

    c = config(replicas=2, iterations=80, log_every=5, eval_every=0, checkpoint_every=20,
               max_restarts=2)
    run = tmp_path / "run"
    trainer = trainer_for(c, run)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(summary=trainer.fit()), daemon=True)
    worker.start()
    while not (run / "checkpoints" / "last.pt").is_file():
        assert worker.is_alive(), outcome
        time.sleep(0.2)
    status = ray.get(ray.get_actor(trainer.hub_name).status.remote())
    os.kill(status["workers"][1], signal.SIGKILL)
    worker.join(timeout=600)
    summary = outcome["summary"]
    assert summary["iterations"] == 80 and summary["worker_failures"] == 1, summary
    failures = records(run, "failure")
    assert len(failures) == 1 and failures[0]["iteration"] % 20 == 0
    iterations = [r["iteration"] for r in records(run)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 80
