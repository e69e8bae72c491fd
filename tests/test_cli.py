"""The command line: output formats, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

import pytest

from distbelief.cli import main


def test_models_json(capsys):
    assert main(["models", "resnet20", "resnet50", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["resnet20", "resnet50"]
    assert rows[0] | {"description": ""} == {
        "name": "resnet20", "family": "cifar", "depth": 20, "residual": True,
        "params": 269_722, "macs": 40_551_040, "input_size": 32, "description": ""}


def test_models_table(capsys):
    assert main(["models", "--family", "cifar"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "depth", "shortcuts", "params", "MACs", "input"]
    assert len(lines) == 1 + 11
    assert lines[1].split() == ["resnet20", "cifar", "20", "yes", "269,722", "40.55M", "32x32"]


def test_models_options_reach_the_model(capsys):
    main(["models", "resnet50", "--variant", "v1.5", "--shortcut", "C", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["macs"] > 4.09e9 and row["params"] > 25_557_032


def test_models_partitions_table_and_json(capsys):
    assert main(["models", "resnet20", "--partitions", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "partition", "units", "params", "MACs", "share",
                                "state", "activations/example"]
    assert [line.split()[1] for line in lines[1:]] == ["0", "1", "2"]
    assert lines[1].split()[2] == "stem" and lines[-1].split()[4] == "head"
    # The last part: 222,730 parameters x 12 bytes (weight, gradient, momentum).
    assert lines[-1].split()[5] == "222,730" and lines[-1].split()[-4:-2] == ["2.5", "MiB"]
    assert main(["models", "resnet20", "--partitions", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(r["params"] for r in rows) == 269_722
    assert sum(r["macs"] for r in rows) == 40_551_040


def exit_code(argv):
    """main's exit code, whether it returns one or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["models", "resnet21"], "unknown model 'resnet21'; choose one of: resnet20,"),
    (["models", "resnet20", "--shortcut", "D"], "choose one of: 'A', 'B', 'C'"),
    (["models", "resnet50", "--variant", "v2"], "choose one of: 'paper', 'v1.5'"),
    (["models", "resnet20", "--input-size", "0"], "input size must be a positive"),
    (["models", "--family", "mnist"], "invalid choice: 'mnist'"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["models", "resnet20", "--partitions", "12"], "cannot cut the model into 12 partitions"),
    (["train", "--partitions", "2", "--mode", "sandblaster"],
     "--partitions applies to --mode single and downpour"),
    (["train", "--micro-batches", "2"], "--micro-batches applies with --partitions 2 or more"),
    (["train", "--recompute"], "--recompute applies with --partitions 2 or more"),
    (["train", "--partition-at", "layer2.1"], "--partition-at applies with --partitions 2 or more"),
    (["models", "resnet20", "--partition-at", "layer2.1"],
     "--partition-at applies with --partitions"),
    (["models", "resnet20", "--partitions", "2", "--partition-at", "layer9"],
     "--partition-at: no unit 'layer9' in the model"),
    (["train", "--partitions", "2", "--partition-at", "layer2.0,layer3.0"],
     "--partition-at names 2 unit(s): 2 partitions begin at 1"),
    (["train", "--partitions", "2", "--partition-dtype", "bfloat16"],
     "--partition-dtype bfloat16 applies under --mode downpour with --partitions 2 or more"),
    (["train", "--mode", "downpour", "--partitions", "2", "--ps-shards", "2",
      "--partition-dtype", "float16"], "invalid partition dtype 'float16'"),
    (["train", "--partitions", "2", "--pipeline-schedule", "zb"],
     "invalid pipeline schedule 'zb'; choose one of: '1f1b', 'gpipe'"),
    (["train", "--partitions", "2", "--pipeline-handoff", "mail"],
     "invalid pipeline hand-off 'mail'; choose one of: 'direct', 'collective', 'driver'"),
    (["train", "--mode", "downpour", "--partitions", "2", "--ps-shards", "2",
      "--pipeline-handoff", "collective"],
     "--pipeline-handoff collective applies under --mode single"),
    (["train", "--partitions", "2", "--micro-batches", "500", "--batch-size", "64"],
     "--micro-batches 500 exceeds --batch-size 64"),
    (["train", "--partitions", "2", "--mode", "sync"],
     "--partitions applies to --mode single and downpour"),
    (["train", "--mode", "sync", "--replicas", "12", "--batch-size", "128"],
     "12 workers with batches of 128 need more than the 1437 training images"),
    (["train", "--mode", "downpour", "--staleness-rule", "stale"],
     "invalid staleness rule 'stale'; choose one of: 'none', 'lr', 'momentum', 'dc', 'dana'"),
    (["train", "--mode", "downpour", "--staleness-rule", "momentum+late"],
     "invalid staleness rule 'late'"),
    (["train", "--mode", "downpour", "--ps-transfer-dtype", "int8"],
     "invalid transfer dtype 'int8'; choose one of: 'float32', 'bfloat16', 'float16'"),
    (["train", "--mode", "downpour", "--ps-threads", "0"], "--ps-threads must be positive, got 0"),
    (["train", "--mode", "downpour", "--fetch-wait-s", "-1"],
     "--fetch-wait-s must be >= 0, got -1.0"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


@pytest.mark.subprocess
def test_installed_command_reports_bad_input_without_traceback():
    """The real entry point, in a fresh interpreter, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "distbelief", "models", "resnet20", "--shortcut", "Z"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "distbelief: error: invalid shortcut option 'Z'; choose one of: 'A', 'B', 'C'\n"


def test_fewer_shards_than_partitions_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--mode", "downpour", "--partitions", "2", "--ps-shards", "1",
            "--out", str(out)]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ps-shards 1 is below the 2 partitions" in err, err
    assert not out.exists()
