"""`distbelief reproduce`: table1 exactly, the short budget's orderings of Fig. 6 and Fig. 7 on
real training runs, resumable runs, bad input as one line with nothing written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distbelief.cli import main
from distbelief.engine.rundir import read_jsonl
from distbelief.errors import ConfigError
from distbelief.paper import reproduce
from distbelief.paper.runner import Runner, RunSpec
from distbelief.recipes import get_recipe


def test_table1_is_exact(tmp_path, capsys):
    assert main(["reproduce", "table1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "table1" / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["resnet50"]["params"] == rows["resnet50"]["torchvision params"] == 25_557_032
    assert rows["resnet152"]["params"] == 60_192_808
    assert abs(rows["resnet34"]["GMACs"] - 3.6) < 0.1 and abs(rows["resnet101"]["GMACs"] - 7.6) < 0.1
    assert results["checks"] and all(c["holds"] for c in results["checks"])
    report = (tmp_path / "table1" / "report.md").read_text()
    assert "| resnet18 | 11,689,512 | 11,689,512 |" in report
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "table7"], "invalid choice: 'table7'"),
    (["reproduce", "fig6", "--models", "resnet999"], "fig6 trains plain20"),
    (["reproduce", "fig6", "--parallel", "0"], "--parallel must be a positive"),
    (["reproduce", "fig6", "--seeds", "0"], "--seeds must be a number of runs per net"),
    (["reproduce", "downpour", "--models", "resnet20"], "--models does not apply"),
    (["reproduce", "fig7", "--data", "cifar10", "--data-dir", "/nonexistent"],
     "CIFAR-10 folder /nonexistent does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        code = main([*argv, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    assert main(["reproduce", "table1", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


def test_fig6_and_fig7_reports_from_runs_cut_short(tmp_path, monkeypatch):
    """The experiments' machinery on runs of 40 iterations (the orderings need the short
    budget's 600: the slow test below): each model trained once and reused by the next
    experiment, the tables, figures and checks written, a second call rebuilding the report
    from the finished runs."""
    import distbelief.paper.experiments as experiments

    budget = experiments.run_config
    monkeypatch.setattr(experiments, "run_config", lambda model, options: budget(
        model, options).replace(iterations=40, milestones=(30,), log_every=10, eval_every=20,
                                checkpoint_every=20))
    lines = []
    fig6 = reproduce("fig6", tmp_path, models=["plain20", "plain56"], say=lines.append)
    assert {r["model"] for r in fig6["rows"]} == {"plain20", "plain56"}
    assert [c["claim"] for c in fig6["checks"]]  # judged, whichever way at 40 iterations
    assert (tmp_path / "fig6" / "fig6-plain.png").stat().st_size > 10_000
    assert (tmp_path / "fig6" / "report.md").read_text().count("plain56") >= 1
    fig7 = reproduce("fig7", tmp_path, models=["plain20", "resnet20"], say=lines.append)
    assert "1 of 2 runs already done" in " ".join(lines)
    rows = {r["model"]: r for r in fig7["rows"]}
    assert rows["plain20"]["layers"] == rows["resnet20"]["layers"] == 19
    again = reproduce("fig7", tmp_path, models=["plain20", "resnet20"], say=lines.append)
    assert again["rows"] == fig7["rows"] and "2 of 2 runs already done" in lines[-1]


def test_seeds_train_one_run_each_and_report_their_spread(tmp_path, monkeypatch):
    """--seeds 2: the first seed's runs are the one-seed runs (reused), the second seed's are
    new; the numbers are the seeds' mean, std and best, computed from each run's summary."""
    import distbelief.paper.experiments as experiments

    budget = experiments.run_config
    monkeypatch.setattr(experiments, "run_config", lambda model, options: budget(
        model, options).replace(iterations=20, milestones=(), log_every=10, eval_every=0,
                                checkpoint_every=20))
    lines = []
    reproduce("table6", tmp_path, models=["resnet20"], say=lines.append)
    table = reproduce("table6", tmp_path, models=["resnet20"], seeds=2, say=lines.append)
    assert "1 of 2 runs already done" in " ".join(lines)
    errors = [100 * json.loads((tmp_path / "runs" / name / "summary.json").read_text())[
        "test_error"] for name in ("resnet20-short-digits", "resnet20-short-digits-seed1")]
    assert errors[0] != errors[1]  # two seeds, two runs
    row = table["rows"][0]
    assert row["test error %"] == pytest.approx(sum(errors) / 2)
    assert row["best %"] == pytest.approx(min(errors))
    assert row["std"] == pytest.approx(abs(errors[0] - errors[1]) / 2 ** 0.5)
    report = (tmp_path / "table6" / "report.md").read_text()
    assert "2 seeds (0 to 1)" in report
    fig6 = reproduce("fig6", tmp_path, models=["plain20", "resnet20"], seeds=2,
                     say=lines.append)
    check = next(c for c in fig6["checks"] if c["claim"].startswith("resnet20 trains"))
    assert check["separated"] is not None and "+-" in check["detail"]
    assert check["mark"] in ("holds", "holds, within the spread", "does NOT hold")
    plain = next(r for r in fig6["rows"] if r["model"] == "plain20")
    assert plain["best test %"] <= plain["test error %"] and plain["test std"] is not None
    fig7 = reproduce("fig7", tmp_path, models=["plain20", "resnet20"], seeds=2,
                     say=lines.append)
    row = next(r for r in fig7["rows"] if r["model"] == "resnet20")
    # Each run's responses, as measured and kept beside the report: the row averages the runs.
    means = [sum(r["std"] for r in layers) / len(layers) for layers in (
        json.loads((tmp_path / "fig7" / f"responses-{name}.json").read_text())
        for name in ("resnet20-short-digits", "resnet20-short-digits-seed1"))]
    assert row["mean std"] == pytest.approx(sum(means) / 2)
    assert row["spread"] == pytest.approx(abs(means[0] - means[1]) / 2 ** 0.5)


@pytest.mark.parametrize("experiment", ["table1", "downpour"])
def test_seeds_apply_to_the_trained_tables_and_figures_only(tmp_path, experiment):
    with pytest.raises(ConfigError, match="--seeds applies to table6, fig6 and fig7"):
        reproduce(experiment, tmp_path / "out", seeds=2)
    assert not (tmp_path / "out").exists()


# ~3 minutes of real training on the short budget, which the orderings need; the machinery is
# covered in make test by the runs cut short above.
@pytest.mark.slow
def test_fig6_and_fig7_short_show_the_papers_orderings(tmp_path):
    """Real runs of the short budget (digits): the deeper plain net trains worse (Fig. 6), the
    ResNet responds less than its plain twin (Fig. 7); fig7 reuses fig6's plain-20 run."""
    lines = []
    fig6 = reproduce("fig6", tmp_path, models=["plain20", "plain56"], say=lines.append)
    assert fig6["checks"] and all(c["holds"] for c in fig6["checks"]), fig6["checks"]
    train = {r["model"]: r["training error %"] for r in fig6["rows"]}
    assert train["plain56"] > train["plain20"] + 5  # not a coin flip: far apart
    assert (tmp_path / "fig6" / "fig6-plain.png").stat().st_size > 10_000
    fig7 = reproduce("fig7", tmp_path, models=["plain20", "resnet20"], say=lines.append)
    assert "1 of 2 runs already done" in " ".join(lines)
    assert [c["holds"] for c in fig7["checks"]] == [True], fig7["checks"]
    rows = {r["model"]: r for r in fig7["rows"]}
    assert rows["plain20"]["layers"] == rows["resnet20"]["layers"] == 19
    report = (tmp_path / "fig7" / "report.md").read_text()
    assert "holds: resnet20 responds less than plain20" in report and "Budget short" in report
    # Nothing to do a second time: the report is rebuilt from the finished runs.
    again = reproduce("fig7", tmp_path, models=["plain20", "resnet20"], say=lines.append)
    assert again["rows"] == fig7["rows"] and "2 of 2 runs already done" in lines[-1]


def _spec(name, iterations=60):
    config = get_recipe("digits").replace(iterations=iterations, milestones=(), log_every=5,
                                          eval_every=0, checkpoint_every=10, device="cpu")
    return RunSpec(name, config)


RUNNER_SCRIPT = """
import sys
from pathlib import Path
from distbelief.engine import TrainingInterrupted
from tests_runner_specs import specs
from distbelief.paper.runner import Runner
try:
    Runner(Path(sys.argv[1]), parallel=2, say=lambda s: print(s, flush=True)).run(specs())
except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
"""


# Two runs in processes of their own, stopped and resumed: make test-all. make test runs
# parallel runs in test_a_failing_run_is_named_and_the_others_finish, and a stop and resume
# of the command in test_cli_signals.py.
@pytest.mark.slow
@pytest.mark.subprocess
def test_parallel_runs_stop_on_sigterm_and_continue_on_rerun(tmp_path):
    (tmp_path / "tests_runner_specs.py").write_text(
        "from distbelief.recipes import get_recipe\n"
        "from distbelief.paper.runner import RunSpec\n"
        "def specs():\n"
        "    c = get_recipe('digits').replace(iterations=120, milestones=(), log_every=5,\n"
        "        eval_every=0, checkpoint_every=10, device='cpu')\n"
        "    return [RunSpec('a', c), RunSpec('b', c.replace(model='plain20'))]\n")
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER_SCRIPT, str(runs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not all((runs / n / "checkpoints" / "last.pt").is_file() for n in "ab"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the parent only: it passes it on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "run the same command again" in err and "Traceback" not in err
    # At least one run was stopped mid-way (the other may have finished meanwhile).
    assert not all((runs / n / "summary.json").exists() for n in "ab"), out
    done = subprocess.run([sys.executable, "-c", RUNNER_SCRIPT, str(runs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in "ab":
        train = [r["iteration"] for r in read_jsonl(runs / name / "metrics.jsonl")
                 if r["kind"] == "train"]
        # Resumed: every record once (the stop adds one at its checkpoint), none lost.
        assert train == sorted(set(train)) and set(range(5, 121, 5)) <= set(train)
        assert json.loads((runs / name / "summary.json").read_text())["iterations"] == 120


def test_a_run_directory_with_other_settings_is_refused_not_mixed(tmp_path):
    Runner(tmp_path, say=lambda line: None).run([_spec("x", 10)])
    summary = (tmp_path / "x" / "summary.json").read_text()
    with pytest.raises(ConfigError, match="x was trained with lr 0.1, not 0.05"):
        Runner(tmp_path).run([RunSpec("x", _spec("x", 10).config.replace(lr=0.05))])
    assert (tmp_path / "x" / "summary.json").read_text() == summary


@pytest.mark.subprocess  # --parallel 2: runs in processes of their own
def test_a_failing_run_is_named_and_the_others_finish(tmp_path):
    bad = _spec("bad").config.replace(data="cifar10", data_dir=str(tmp_path / "missing"))
    lines = []
    with pytest.raises(Exception, match="bad"):
        Runner(tmp_path, parallel=2, say=lines.append).run(
            [_spec("good", 20), RunSpec("bad", bad)])
    assert (tmp_path / "good" / "summary.json").is_file()
    assert not (tmp_path / "bad").exists()  # it could not start: nothing written
