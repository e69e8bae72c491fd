"""`distbelief reproduce fig4`: DistBelief's Fig. 4 on the virtual cluster. The machinery on
short runs at 1, 2 and 4 replicas (the whole experiment is `--budget short`, minutes), and the
report's arithmetic on records of known numbers."""

import json

import pytest

from distbelief.paper import reproduce
from distbelief.paper import fig4
from distbelief.paper.budgets import Options


def test_the_runs_are_a_single_process_and_virtual_clusters_of_each_size():
    specs = fig4.Fig4().specs(Options())
    assert specs[0].name == "fig4-single-short-digits" and specs[0].config.mode == "single"
    virtual = specs[1:]
    assert [s.config.cluster.replicas for s in virtual] == list(fig4.REPLICAS) * 4
    assert all(s.config.downpour.virtual and s.config.batch_size == 16 for s in virtual)
    assert {s.config.optimizer for s in virtual} == {"sgd", "adagrad"}
    steps = {s.config.downpour.virtual_step_ms for s in virtual}
    assert steps == {None, 100.0}  # measured here, and compute-bound
    # Every run trains the same minibatches over all its replicas.
    assert {s.config.iterations for s in specs} == {4000}


def _run(tmp_path, name, evals, step_s, staleness=1.0):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "split": "test", "iteration": i, "wall_s": t,
                    "error": e}) + "\n" for i, t, e in evals))
    (run / "summary.json").write_text(json.dumps({
        "staleness_mean": staleness, "virtual": {"step_s": step_s}, "real_wall_s": 9.0}))
    return run


def test_time_to_target_and_speed_up_are_read_from_the_records(tmp_path):
    one = fig4._reached(_run(tmp_path, "one", [(50, 1.0, 0.5), (100, 2.0, 0.07),
                                               (150, 3.0, 0.06)], step_s=0.01), 0.08)
    assert (one["time"], one["minibatches"], one["final"]) == (2.0, 100, 0.06)
    # Four replicas reach it at 0.6 s, but their steps were measured 20% slower: the
    # speed-up counts each run in its own steps, (2.0 / 0.01) / (0.6 / 0.012) = 4.
    four = fig4._reached(_run(tmp_path, "four", [(50, 0.3, 0.2), (100, 0.6, 0.08)],
                              step_s=0.012), 0.08)
    assert fig4._speedup(one, four) == pytest.approx(4.0)
    never = fig4._reached(_run(tmp_path, "never", [(50, 0.3, 0.5)], step_s=0.01), 0.08)
    assert never["time"] is None and fig4._speedup(one, never) is None


def test_the_claims_follow_the_curve():
    rising_then_flat = [(1, 1.0), (2, 1.9), (4, 3.5), (8, 5.0), (16, 4.0), (32, None),
                        (64, None)]
    sooner, flattens = fig4._checks("downpour", rising_then_flat)
    assert sooner.holds and "5.00x at 8" in sooner.detail and flattens.holds
    stalled = [(1, 1.0), (2, 0.9), (4, 1.3), (8, None), (16, None), (32, None), (64, None)]
    sooner, _ = fig4._checks("downpour", stalled)
    assert not sooner.holds and "1.30x at 4" in sooner.detail  # not clearly faster
    (nothing,) = fig4._checks("downpour", [(n, None) for n in fig4.REPLICAS])
    assert not nothing.holds


def test_fig4_trains_and_reports_on_short_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fig4, "REPLICAS", (1, 2, 4))
    monkeypatch.setitem(fig4.PLAN, ("digits", "short"), (120, 0.5))
    results = reproduce("fig4", tmp_path, say=lambda line: None)
    rows = results["rows"]
    assert len(rows) == 1 + 4 * 3 + 2 * 3 and rows[0]["replicas"] == 1
    virtual = [r for r in rows[1:] if r["scheme"].startswith("downpour, measured")]
    assert [r["replicas"] for r in virtual] == [1, 2, 4]
    assert virtual[0]["speed-up"] == 1.0  # one replica against itself
    assert all(r["mean staleness"] is not None for r in virtual)
    blaster = [r for r in rows if r["scheme"].startswith("sandblaster L-BFGS, compute-bound")]
    assert [r["replicas"] for r in blaster] == [1, 2, 4] and blaster[0]["speed-up"] == 1.0
    assert 1.5 < blaster[2]["speed-up"] <= 4  # four replicas share each round's portions
    report = (tmp_path / "fig4" / "report.md").read_text()
    assert "simulated" in report and "fig4-speedup.png" in report
    assert "cannot keep up" in report  # where the measured shards saturate, in numbers
    assert (tmp_path / "fig4" / "fig4-speedup.png").stat().st_size > 5_000
    assert (tmp_path / "fig4" / "fig4-wall.png").stat().st_size > 5_000
