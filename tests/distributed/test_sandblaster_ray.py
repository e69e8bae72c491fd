"""Sandblaster L-BFGS on a real local Ray: the distributed iterates equal the local core's,
backup tasks and replica failures neither lose nor double-count a portion."""

import threading
import time

import numpy as np
import pytest
import torch

from distbelief.distributed import SandblasterTrainer
from distbelief.distributed.sandblaster import LocalBatchObjective
from distbelief.engine import load_checkpoint
from distbelief.engine.rundir import read_jsonl
from distbelief.optim.lbfgs import LBFGS, LocalStore
from distbelief.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("ray_cluster")
ITERATIONS = 12


def config(**kw):
    # float64: the line search's cubic interpolation can branch on float32 rounding, which
    # would make runs that differ only in summation order take different (valid) paths.
    settings = dict(recipe="test", replicas=1, ps_shards=1, iterations=ITERATIONS, device="cpu",
                    eval_every=0, checkpoint_every=0, log_every=1, dtype="float64")
    return get_recipe("digits-sandblaster").replace(**{**settings, **kw})


def local_losses(c, iterations=ITERATIONS):
    """The local core on the same objective: per-iteration losses and the final x."""
    objective = LocalBatchObjective(c)
    store = LocalStore()
    store.run([("set", "x", objective.initial)])
    opt = LBFGS(store, objective, history=c.sandblaster.history, lr=c.lr,
                line_search=c.sandblaster.line_search)
    losses = [opt.start()["loss"]]
    for _ in range(iterations):
        losses.append(opt.step()["loss"])
    return losses, store.read("x")


def distributed_run(c, run_dir, during=None):
    trainer = SandblasterTrainer(c, run_dir)
    if during is not None:
        threading.Thread(target=during, args=(trainer,), daemon=True).start()
    summary = trainer.fit()
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    x = torch.cat([v.reshape(-1) for v in
                   load_checkpoint(run_dir / "checkpoints/last.pt")["model"].values()])
    return summary, records, x


@pytest.fixture(scope="module")
def reference():
    return local_losses(config())


def assert_same_iterates(records, x, reference, rtol=1e-5):
    losses, x_ref = reference
    assert [r["iteration"] for r in records] == list(range(len(losses)))
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=rtol)
    torch.testing.assert_close(x, x_ref.float(), rtol=rtol, atol=rtol)  # last.pt is float32


def test_one_replica_one_shard_equals_the_local_core(tmp_path, reference):
    summary, records, x = distributed_run(config(), tmp_path / "run", )
    assert_same_iterates(records, x, reference)
    assert summary["iterations"] == ITERATIONS and summary["mode"] == "sandblaster"
    assert summary["portions_per_replica"] == [summary["evaluations"] * summary["portions"]]
    assert summary["backup_wasted"] == 0 and summary["replica_failures"] == 0
    first = records[1]
    assert {"grad_norm", "step", "evals", "portions_per_replica", "backup_tasks",
            "backup_wasted", "coordinator_s", "gradient_s"} <= first.keys()


def test_replicas_and_shards_give_the_same_iterates(tmp_path, reference):
    c = config(replicas=2, ps_shards=3, portions=24, push_every=3)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert_same_iterates(records, x, reference)
    assert summary["portions_recomputed"] == 0
    assert sum(summary["portions_per_replica"]) == summary["evaluations"] * 24
    assert min(summary["portions_per_replica"]) > 0


def test_backup_tasks_beat_a_straggler_and_late_duplicates_count_once(tmp_path, reference):
    # Replica 0 takes 50 ms per portion, replica 1 well under 1 ms: each portion the straggler
    # starts is backed up, and its copy arrives rounds later, after the winner.
    c = config(replicas=2, ps_shards=2, portions=8, straggler_delay=0.05)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert_same_iterates(records, x, reference)
    assert summary["backup_tasks"] > 0
    assert summary["backup_wasted"] > 0
    # The fast replica does most portions (load balancing), the straggler a few.
    fast, slow = summary["portions_per_replica"][1], summary["portions_per_replica"][0]
    assert fast > 2 * slow

    c = c.replace(backup_tasks=False)
    summary, records, x = distributed_run(c.replace(iterations=3), tmp_path / "no-backups")
    assert summary["backup_tasks"] == 0 and summary["backup_wasted"] == 0
    np.testing.assert_allclose([r["loss"] for r in records], reference[0][:4], rtol=1e-5)


def test_killing_a_replica_while_it_computes_loses_and_double_counts_nothing(tmp_path,
                                                                            reference):
    import ray

    c = config(replicas=2, ps_shards=2, portions=16, push_every=4, straggler_delay=0.02)

    def kill(trainer):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.round < 4:
            time.sleep(0.01)
        time.sleep(0.05)  # inside a round: portions are in flight and in accumulators
        ray.kill(trainer.replicas[1], no_restart=False)

    summary, records, x = distributed_run(c, tmp_path / "run", during=kill)
    assert summary["replica_failures"] == 1 and summary["replica_restarts"] == 1
    assert_same_iterates(records, x, reference)
    failures = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "failure"]
    assert [f["actor"] for f in failures] == ["replica 1"]


def test_portions_a_dead_replica_won_but_never_pushed_are_computed_again(tmp_path, reference,
                                                                         monkeypatch):
    """Replica 1 holds every portion it won until the end of the round (push_every is larger
    than the batch) and dies just before pushing them in round 4: they are missing on the
    shards, found, and computed again, once each."""
    import ray

    from distbelief.distributed.sandblaster.gradient import BatchGradient

    original = BatchGradient._collect
    killed = []

    def collect(self, round_):
        if round_ == 4 and not killed:  # once: round 4 is collected again after the repair
            killed.append(round_)
            replica = self.replicas[1]
            pid = ray.get(replica.info.remote())["pid"]
            ray.kill(replica, no_restart=False)
            while True:  # the kill is asynchronous: wait until that process is gone
                try:
                    if ray.get(replica.info.remote(), timeout=60)["pid"] != pid:
                        break
                except ray.exceptions.RayActorError:
                    break
                time.sleep(0.01)
        return original(self, round_)

    monkeypatch.setattr(BatchGradient, "_collect", collect)
    c = config(replicas=2, ps_shards=2, portions=16, push_every=100, backup_tasks=False)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert summary["replica_failures"] == 1
    assert summary["portions_recomputed"] > 0
    assert_same_iterates(records, x, reference)


def test_softmax_regression_reaches_the_scipy_optimum(tmp_path):
    """The digits-sandblaster recipe (float32, 2 replicas, 2 shards) against scipy's L-BFGS-B
    on the same objective in float64."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    c = get_recipe("digits-sandblaster").replace(device="cpu")
    objective = LocalBatchObjective(c.replace(dtype="float64"))

    def fun(w):
        f, g = objective.value_and_grad(torch.from_numpy(w))
        return f, g.numpy()

    best = scipy_optimize.minimize(fun, objective.initial.numpy(), jac=True, method="L-BFGS-B",
                                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
    assert best.success, best.message
    summary = SandblasterTrainer(c, tmp_path / "run").fit()
    assert summary["converged"] or summary["iterations"] == c.iterations
    assert abs(summary["train_loss"] - best.fun) <= 1e-4 * best.fun
    assert summary["test_accuracy"] > 0.9


def test_a_lost_shard_stops_the_run_in_one_line_and_keeps_the_checkpoint(tmp_path):
    import ray

    from distbelief.errors import DistbeliefError

    c = config(replicas=1, ps_shards=2, iterations=1000, checkpoint_every=2,
               batch_size=256, straggler_delay=0.01)  # new batches: it never converges

    def kill(trainer):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.iteration < 3:
            time.sleep(0.01)
        ray.kill(trainer.shards[1], no_restart=True)

    trainer = SandblasterTrainer(c, tmp_path / "run")
    threading.Thread(target=kill, args=(trainer,), daemon=True).start()
    with pytest.raises(DistbeliefError, match="parameter-server shard is gone"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert saved["iteration"] >= 2 and saved["mode"] == "sandblaster"


def test_resume_retraces_the_uninterrupted_run(tmp_path, reference):
    c = config(replicas=2, ps_shards=2)
    SandblasterTrainer(c.replace(iterations=5), tmp_path / "run").fit()
    assert (tmp_path / "run/checkpoints/vectors-1.pt").is_file()
    summary = SandblasterTrainer(c, tmp_path / "run", resume=True).fit()
    assert summary["iterations"] == ITERATIONS
    records = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"]
    x = torch.cat([v.reshape(-1) for v in
                   load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"].values()])
    assert_same_iterates(records, x, reference)

    # Without a shard's snapshot it goes on from last.pt's parameters with a fresh history.
    (tmp_path / "run/checkpoints/vectors-1.pt").unlink()
    summary = SandblasterTrainer(c.replace(iterations=ITERATIONS + 2), tmp_path / "run",
                                 resume=True).fit()
    assert summary["iterations"] == ITERATIONS + 2
    assert summary["train_loss"] <= reference[0][-1]
