"""Checkpoints are atomic and load without running code."""

import pickle

import pytest
import torch

from distbelief.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from distbelief.errors import CheckpointError, StorageError


def test_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"iteration": 3, "w": torch.arange(4.0), "cfg": {"lr": [0.1]}})
    state = load_checkpoint(path)
    assert state["iteration"] == 3 and torch.equal(state["w"], torch.arange(4.0))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"iteration": 1})

    def crash(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(StorageError, match=r"cannot write .*c\.pt: disk full"):
        atomic_write(path, crash)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


@pytest.mark.parametrize("cut", [0, 10, 200, -20])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "distbelief.checkpoint", "version": 1, "x": _Evil()}, "evil.pt")
    with pytest.raises(CheckpointError, match="unsafe to load"):
        load_checkpoint("evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a distbelief checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "p.pkl").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "p.pkl")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
