"""benchmarks/gpu_check.sh, the one GPU check: run end to end on the CPU at tiny sizes
(--cpu-dry-run) so that it cannot rot before a GPU arrives, and its bookkeeping (a failing
section is said in its place, the others run, the status is 1)."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.subprocess  # the script, pytest -m gpu inside it, Ray for Downpour
def test_the_dry_run_runs_every_section_and_writes_one_results_file(tmp_path):
    out = tmp_path / "gpu-check.md"
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for title in ("GPU-marked tests", "Compiled step against eager", "ResNet-20 on CIFAR-10",
                  "Downpour, 2 replicas"):
        assert f"## {title}" in text
    assert "skipped" in text  # the GPU tests were collected (and skipped on the CPU)
    row = next(line for line in text.splitlines() if line.startswith("| mlp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and int(cells[6]) >= 1
    assert cells[8] == "0 + 0"  # nothing compiled after the warm-up
    assert "iterations in" in text and "| downpour 2 replicas x 2 shards |" in text
    assert "FAILED" not in text and text.rstrip().endswith("Check passed.")


def test_a_failing_section_is_said_in_its_place_and_fails_the_check(tmp_path):
    gpu_check = _module()
    results = gpu_check.Results(tmp_path / "r.md", ["# head"])
    results.section("fine", lambda: (["ok line"], True))
    results.section("broken", lambda: 1 / 0)
    results.section("late", lambda: (["measured"], False))
    text = (tmp_path / "r.md").read_text()
    assert "## broken" in text and "FAILED: ZeroDivisionError: division by zero" in text
    assert "ok line" in text and "measured" in text  # written as each ended
    assert results.failed == ["broken", "late"]


def test_without_a_gpu_the_full_check_refuses_in_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    gpu_check = _module()
    assert gpu_check.main(["--out", "/nonexistent/never-written.md"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device here" in err and len(err.strip().splitlines()) == 1

