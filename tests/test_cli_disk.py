"""The real command against full and read-only disks, paths through regular files and a second
writer: one line on stderr, a non-zero exit, no traceback, and the earlier checkpoint intact.

Full and read-only disks are small tmpfs mounts (skipped where this user cannot mount)."""

import shutil
import subprocess
import sys
import time

import pytest

from distbelief.engine import load_checkpoint
from distbelief.engine.rundir import read_jsonl

pytestmark = pytest.mark.subprocess
RESNET = ["--recipe", "digits", "--quiet", "--log-every", "10", "--eval-every", "50",
          "--checkpoint-every", "20"]


def train(out, *more, **popen):
    args = [sys.executable, "-m", "distbelief", "train", *RESNET, "--out", str(out), *more]
    if popen:
        return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def one_error_line(done, says):
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("distbelief: error: ") and says in lines[0], lines


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a tmpfs of that size under tmp_path."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if shutil.which("mount") is None or done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(small_disk):
    disk = small_disk("3m")  # room for one 2.2 MB ResNet-20 checkpoint, not for its successor
    out = disk / "run"
    done = train(out, "--iterations", "60")
    one_error_line(done, f"cannot write {out}/checkpoints/last.pt: No space left on device")
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 20
    assert not list(out.rglob("*.tmp"))


def test_a_full_disk_under_downpour_stops_ray_too(small_disk, ray_watch):
    """The driver's write of a checkpoint generation fails: one line, every actor and the
    local Ray stopped, the torn generation never published."""
    before = ray_watch.processes()
    out = small_disk("1m") / "run"  # config and records fit, a generation (~5 MB) does not
    done = train(out, "--mode", "downpour", "--iterations", "60")
    one_error_line(done, "No space left on device")
    assert f"cannot write {out}/checkpoints/gen-000001/" in done.stderr
    assert not ray_watch.new_since(before), "Ray processes outlived the error"
    assert not (out / "checkpoints" / "manifest.json").exists()


def test_a_read_only_disk_refuses_before_anything_starts(small_disk):
    disk = small_disk("8m")
    out = disk / "run"
    assert train(out, "--iterations", "20").returncode == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    one_error_line(train(out, "--resume", "--iterations", "40"),
                   f"cannot write in {out}: read-only file system")
    one_error_line(train(disk / "new", "--iterations", "20"),
                   f"cannot write in {disk}: read-only file system")
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_an_out_below_a_regular_file_fails_before_ray_starts(tmp_path):
    (tmp_path / "file").write_text("x")
    began = time.monotonic()
    done = train(tmp_path / "file" / "run", "--mode", "downpour", "--iterations", "20")
    one_error_line(done, f"{tmp_path}/file is not a folder")
    assert time.monotonic() - began < 15  # Ray's start alone takes longer, and never came


def test_a_run_and_a_resume_of_it_leave_one_writer(tmp_path):
    out = tmp_path / "run"
    first = train(out, "--iterations", "200", stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").is_file():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = train(out, "--resume", "--iterations", "200")
    one_error_line(second, f"{out} is in use by another distbelief run (pid {first.pid} on ")
    first.communicate(timeout=300)
    assert first.returncode == 0
    _assert_records_go_forward(out, 200)


def test_two_resumes_at_once_leave_one_writer(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--iterations", "20").returncode == 0
    runs = [train(out, "--resume", "--iterations", "200", stdout=subprocess.DEVNULL)
            for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in runs)
    assert [rc for rc, _ in results] == [0, 2], results
    assert "is in use by another distbelief run" in results[1][1]
    _assert_records_go_forward(out, 200)


def _assert_records_go_forward(out, iterations):
    records = read_jsonl(out / "metrics.jsonl")
    train_at = [r["iteration"] for r in records if r["kind"] == "train"]
    assert train_at == sorted(set(train_at)) and train_at[-1] == iterations
    assert [r["kind"] for r in records].count("resume") <= 1
