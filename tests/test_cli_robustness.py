"""What careless users and damaged files do to the command line, run in process: every case is
an exit code, one line on stderr and no traceback (an exception escaping `main` fails the test),
nothing written before a run can start, and no earlier checkpoint lost."""

import random
import shutil

import pytest
import torch

from distbelief.cli import main
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.engine.lifecycle import RunLifecycle
from distbelief.engine.rundir import RunDir, read_jsonl
from distbelief.errors import CheckpointError
from distbelief.recipes import get_recipe
from support.runs import at

TINY = ["--recipe", "digits", "--model", "softmax", "--quiet", "--log-every", "5",
        "--eval-every", "10", "--checkpoint-every", "10"]


def cli(capsys, *args) -> tuple[int, list[str]]:
    """`distbelief ARGS` in this process: (exit status, stderr lines)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.splitlines()


def assert_one_line(rc, err, says=""):
    assert rc == 2 and len(err) == 1 and err[0].startswith("distbelief: error: "), err
    assert says in err[0], err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 20-iteration run (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--iterations", "20", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "1e308"], "--epochs 1e+308 is more than 1,000,000,000,000 iterations"),
    (["--iterations", str(10**13)], "--iterations 10000000000000 is more than"),
    (["--seed", "1e23"], "--seed: cannot read '1e23' as int"),
    (["--seed", str(10**23)], "--seed must be an integer in 0 .. 2**63 - 1"),
    (["--seed", "-1"], "--seed must be an integer in 0 .. 2**63 - 1"),
    (["--model", "mlp", "--hidden", "-5"], "--hidden must be positive, got -5"),
    (["--pad", "100000"], "--pad 100000 exceeds the images' 8 px side"),
    (["--data", "synthetic", "--synthetic-shape", "3,100000,100000"],
     "take 64373.0 GiB, more than half of this machine's"),
    (["--connect-timeout-s", "0"], "--connect-timeout-s must be a positive number")])
def test_nonsense_numbers_are_one_line_and_leave_nothing(capsys, tmp_path, flags, says):
    out = tmp_path / "run"
    rc, err = cli(capsys, "train", "--recipe", "digits", "--quiet", *flags, "--out", out)
    assert_one_line(rc, err, says)
    assert not out.exists()


def test_a_finished_run_resumed_adds_no_record(capsys, finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    rc, err = cli(capsys, "train", "--resume", "--out", run, "--quiet")
    assert rc == 0 and err == []
    assert (run / "metrics.jsonl").read_bytes() == before
    # More iterations: a resume record and records past 20, none repeated.
    assert cli(capsys, "train", "--resume", "--out", run, "--iterations", "30", "--quiet")[0] == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["kind"] for r in records].count("resume") == 1
    evals = [r["iteration"] for r in records if r["kind"] == "eval"]
    assert evals == [10, 20, 30]


def test_a_single_process_resume_refuses_other_data(capsys, finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    rc, err = cli(capsys, "train", "--resume", "--out", run, "--iterations", "30", "--data",
                  "synthetic", "--quiet")
    assert_one_line(rc, err, "was trained with --data digits, not synthetic")


def test_eval_of_a_checkpoint_whose_config_is_not_a_mapping(capsys, finished, tmp_path):
    state = load_checkpoint(finished / "checkpoints" / "last.pt")
    path = tmp_path / "odd.pt"
    torch.save({**state, "config": "resnet20 please"}, path)
    assert_one_line(*cli(capsys, "eval", "--checkpoint", path), "config is not a mapping")


# --- fuzz: every file of a run folder, damaged in the ways disks and people damage them ------

FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt")
WRONG_TYPE = {".yaml": b"- one\n- two\n", ".jsonl": b'[1, "two"]\n"three"\n',
              ".json": b'["a", "list"]\n'}


def corrupt(path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:rng.randrange(len(data))])
    elif how == "flip":
        flipped = bytearray(data)
        for _ in range(8):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
    elif how == "wrong-type" and path.suffix == ".pt":
        torch.save([1, 2, 3], path)
    elif how == "wrong-type":
        path.write_bytes(WRONG_TYPE[path.suffix])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("how, seed", [("truncate", 0), ("truncate", 1), ("flip", 0),
                                       ("flip", 1), ("wrong-type", 0), ("empty", 0)])
def test_damaged_run_files_never_give_a_traceback_or_lose_a_checkpoint(
        capsys, finished, tmp_path, name, how, seed):
    run = shutil.copytree(finished, tmp_path / "run")
    corrupt(run / name, how, random.Random(f"{name}{how}{seed}"))
    damaged = (run / name).read_bytes()
    for args in (["train", "--resume", "--out", run, "--iterations", "30", "--quiet"],
                 ["plot", run, "--output", tmp_path / "curves.png"],
                 ["eval", "--checkpoint", run / "checkpoints" / "last.pt"]):
        rc, err = cli(capsys, *args)
        assert rc == 0 or (rc == 2 and len(err) == 1 and err[0].startswith(
            "distbelief: error: ")), (args[0], err)
    last = run / "checkpoints" / "last.pt"
    if name == "checkpoints/last.pt":
        assert last.read_bytes() == damaged  # a damaged checkpoint is refused, not replaced
    else:
        assert load_checkpoint(last)["iteration"] in (20, 30)  # the earlier one, or a newer
    train = [r["iteration"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert train == sorted(set(train))  # records never go backwards or repeat


@pytest.mark.parametrize("how, seed", [("truncate", 0), ("truncate", 1), ("flip", 0),
                                       ("wrong-type", 0), ("empty", 0)])
def test_a_damaged_manifest_stops_a_resume_with_one_error(tmp_path, how, seed):
    config = get_recipe("digits-downpour")
    run = RunDir(tmp_path)
    life = RunLifecycle(tmp_path, mode="downpour", state="downpour")
    life.open(config, resume=False)
    life.begin(at(config, 0))
    life.save_generation(config, {"steps": 10}, {"shard-0": {"v": 1}}, 10)
    life.release()
    corrupt(run.manifest, how, random.Random(seed))
    again = RunLifecycle(tmp_path, mode="downpour", state="downpour")
    try:
        saved = again.open(config, resume=True)
    except CheckpointError as e:
        assert "manifest.json" in str(e) and "\n" not in str(e)
    else:  # a flip that left the JSON naming the same folder
        assert saved["steps"] == 10
    again.release()
    assert load_checkpoint(run.checkpoints / "gen-000001" / "downpour.pt")["steps"] == 10
