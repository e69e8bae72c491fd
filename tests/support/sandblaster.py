"""Sandblaster test helpers: a float64 config, the local core's iterates, a distributed run
and the comparison of the two."""

import threading

import numpy as np
import torch

from distbelief.distributed import SandblasterTrainer
from distbelief.distributed.sandblaster import LocalBatchObjective
from distbelief.engine import load_checkpoint
from distbelief.engine.rundir import read_jsonl
from distbelief.optim.lbfgs import LBFGS, LocalStore
from distbelief.recipes import get_recipe


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


def assert_same_iterates(records, x, reference, rtol=1e-5):
    losses, x_ref = reference
    assert [r["iteration"] for r in records] == list(range(len(losses)))
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=rtol)
    torch.testing.assert_close(x, x_ref.float(), rtol=rtol, atol=rtol)  # last.pt is float32
