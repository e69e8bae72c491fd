"""Sandblaster L-BFGS equals the L-BFGS core on local tensors (itself equal to
torch.optim.LBFGS, tests/parity/test_lbfgs.py): the sharded store, and real replicas and shards
on Ray, give the local core's iterates; softmax regression reaches scipy's optimum."""

import pytest
import torch

from distbelief.distributed import SandblasterTrainer
from distbelief.distributed.sandblaster import LocalBatchObjective, LocalShards
from distbelief.optim.lbfgs import LBFGS, FunctionObjective, LocalStore
from distbelief.recipes import get_recipe
from support.sandblaster import (ITERATIONS, assert_same_iterates, config, distributed_run,
                                 local_losses)


def test_sharded_store_computes_what_the_local_store_does():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(101, generator=g), torch.randn(101, generator=g)
    commands = [("set", "a", a), ("set", "b", b), ("lincomb", "c", 2.0, "a", -0.5, "b"),
                ("axpy", "c", 3.0, "a"), ("scale", "d", -1.0, "c"), ("copy", "e", "d"),
                ("dot", "c", "e"), ("abssum", "d"), ("absmax", "c"), ("zero", "z", "a"),
                ("dot", "z", "a"), ("free", "e")]
    local, sharded = LocalStore(), LocalShards(101, 3)
    expected, got = local.run(commands), sharded.run(commands)
    assert got == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(sharded.read("c"), local.read("c"))
    assert all("e" not in s.slots for s in sharded.shards)
    assert [s.hi - s.lo for s in sharded.shards] == [34, 34, 33]


def test_lbfgs_on_shards_matches_lbfgs_on_local_tensors():
    A = torch.diag(torch.linspace(1, 30, 40, dtype=torch.float64))
    A[0, 1] = A[1, 0] = 0.5
    fn = lambda x: (0.5 * x @ A @ x - x.sum(), A @ x - 1)  # noqa: E731
    iterates = []
    for store in (LocalStore(), LocalShards(40, 4)):
        store.run([("set", "x", torch.zeros(40, dtype=torch.float64))])
        opt = LBFGS(store, FunctionObjective(fn), history=4)
        opt.start()
        for _ in range(8):
            opt.step()
        iterates.append(store.read("x"))
    assert torch.allclose(iterates[0], iterates[1], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def reference():
    return local_losses(config())


def test_one_replica_one_shard_equals_the_local_core(ray_cluster, tmp_path, reference):
    summary, records, x = distributed_run(config(), tmp_path / "run", )
    assert_same_iterates(records, x, reference)
    assert summary["iterations"] == ITERATIONS and summary["mode"] == "sandblaster"
    assert summary["portions_per_replica"] == [summary["evaluations"] * summary["portions"]]
    assert summary["backup_wasted"] == 0 and summary["replica_failures"] == 0
    first = records[1]
    assert {"grad_norm", "step", "evals", "portions_per_replica", "backup_tasks",
            "backup_wasted", "coordinator_s", "gradient_s"} <= first.keys()


def test_replicas_and_shards_give_the_same_iterates(ray_cluster, tmp_path, reference):
    c = config(replicas=2, ps_shards=3, portions=24, push_every=3)
    summary, records, x = distributed_run(c, tmp_path / "run")
    assert_same_iterates(records, x, reference)
    assert summary["portions_recomputed"] == 0
    assert sum(summary["portions_per_replica"]) == summary["evaluations"] * 24
    assert min(summary["portions_per_replica"]) > 0


# make test-all. In make test the sharded replicas give the local core's iterates (above), and
# the local core gives torch.optim.LBFGS's (test_lbfgs.py).
@pytest.mark.slow
def test_softmax_regression_reaches_the_scipy_optimum(ray_cluster, tmp_path):
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
