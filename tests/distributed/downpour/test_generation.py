"""Checkpoint generations written piece by piece (`downpour.generation`, `engine.pieces`): the
shards' own files, a last.pt that says where the model lies, and the model assembled from
them. No Ray: the pieces are written here as a shard writes them."""

import os

import numpy as np
import pytest
import torch

from distbelief.data import build_data
from distbelief.distributed.downpour.generation import (MARKER, begin_pieces, check_pieces,
                                                        fingerprint, sees, write_piece)
from distbelief.distributed.downpour.layout import server_layout, start_values
from distbelief.distributed.downpour.replica import initial_model
from distbelief.engine.checkpoint import PIECES, load_checkpoint, save_checkpoint
from distbelief.engine.lifecycle import Diverged
from distbelief.engine.rundir import RunDir
from distbelief.errors import CheckpointError
from support.downpour import digits_config


def _index(config, data, plan, slots, folder) -> dict:
    return {"config": config.to_dict(), "iteration": 0, "data_stats": data.stats,
            "num_classes": data.num_classes, "in_chans": data.in_chans, "mode": "downpour",
            PIECES: {"folder": folder.name, "bounds": list(plan.bounds),
                     "shards": [[f"shard-{k}.pt", s.lo, s.hi] for k, s in enumerate(slots)]}}


def test_a_model_is_assembled_from_its_shards_files_as_the_whole_model(tmp_path):
    config = digits_config(partitions=3, ps_shards=5, seed=4)
    data = build_data(config, torch.device("cpu"))
    starts, plan, slots, _ = server_layout(config, data)
    run = RunDir(tmp_path / "run")
    folder, _ = begin_pieces(run)
    for k, start in enumerate(starts):
        reply = write_piece({"w": start_values(start).copy(), "index": k}, folder / f"shard-{k}.pt")
        assert reply == {"finite": True}
    save_checkpoint(folder / "last.pt", _index(config, data, plan, slots, folder))
    run.publish_generation(folder, {}, 0, pieces=("last.pt",))
    expected = initial_model(config, data).state_dict()
    model = load_checkpoint(folder / "last.pt")["model"]
    assert list(model) == list(expected)
    for name, value in expected.items():
        assert torch.equal(model[name], value), name
    # Its copy beside the generation finds the folder by name.
    os.replace(folder / "last.pt", run.checkpoints / "last.pt")
    assert torch.equal(load_checkpoint(run.checkpoints / "last.pt")["model"]["fc.bias"],
                       expected["fc.bias"])
    assert "model" not in load_checkpoint(run.checkpoints / "last.pt", assemble=False)
    # A piece gone (a newer generation replaced it) is one line.
    os.remove(folder / "shard-2.pt")
    with pytest.raises(CheckpointError, match="shard-2.pt, a piece of .* is missing"):
        load_checkpoint(run.checkpoints / "last.pt")


def test_a_shard_sees_the_driver_s_file_only_as_the_driver_saw_it(tmp_path):
    run = RunDir(tmp_path / "run")
    folder, seen = begin_pieces(run)
    marker = folder / MARKER
    assert seen == fingerprint(marker) and sees(marker, seen)
    assert not sees(tmp_path / "elsewhere" / MARKER, seen)  # another machine: no such file
    marker.write_text("another run's marker, the same path\n")
    os.utime(marker, ns=(1, 1))
    assert not sees(marker, seen)


def test_a_generation_is_published_only_whole_and_finite(tmp_path):
    run = RunDir(tmp_path / "run")
    first = run.write_generation({"state": {"x": 1}}, 3)
    folder, _ = begin_pieces(run)
    with pytest.raises(CheckpointError, match="lacks shard-0.pt"):
        run.publish_generation(folder, {"state": {"x": 2}}, 4, pieces=("shard-0.pt",))
    assert run.generation() == first
    bad = write_piece({"w": np.array([1.0, np.nan], np.float32)}, folder / "shard-0.pt")
    good = write_piece({"w": np.ones(2, np.float32)}, folder / "shard-1.pt")
    assert bad == {"finite": False} and good == {"finite": True}
    with pytest.raises(Diverged, match="not finite at iteration 7"):
        check_pieces(type("T", (), {"steps": 7}), [good, bad])
    run.discard(folder)
    assert not folder.exists() and run.generation() == first
    assert load_checkpoint(run.state_file("state"))["x"] == 1
