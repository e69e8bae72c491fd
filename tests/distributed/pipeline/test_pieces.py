"""A single-mode partitioned run's checkpoint pieces (`engine.pieces`, kind "parts"), without
Ray: each part's tensors and optimizer state written under their unit names, read back by any
other cut (or none) with every value in its place, and a part's values checked for NaN."""

import copy

import pytest
import torch

from distbelief.distributed.pipeline.actors import StageHost
from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.stage import optimizer_slice
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.engine.pieces import from_parts, from_pieces, to_piece, write_part
from distbelief.engine.trainer import build_optimizer
from distbelief.errors import CheckpointError
from distbelief.models import create_model
from support.downpour import digits_config


def trained(seed=0):
    """ResNet-20 (BatchNorm: buffers, an int counter) and its SGD optimizer after two steps:
    every tensor and momentum buffer distinct."""
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    opt = build_optimizer(digits_config(mode="single", momentum=0.9), model)
    for _ in range(2):
        model(torch.randn(4, 1, 8, 8)).square().mean().backward()
        opt.step()
    return model, opt


def cut(model, parts):
    device = next(model.parameters()).device  # a meta model is cut on a meta sample
    return partition(model, parts, torch.zeros(1, 1, 8, 8, device=device)).parts


def pieces_of(model, opt, parts):
    """Each part's piece, from the whole model's state as the runner hands it to its parts."""
    full = opt.state_dict()
    return [to_piece({"module": p.module.state_dict(),
                      "optimizer": optimizer_slice(full, p.offset, p.n_tensors)},
                     p.module, p.names) for p in cut(model, parts)]


def test_another_cut_reads_every_tensor_and_momentum_in_its_place():
    model, opt = trained()
    pieces = pieces_of(model, opt, 3)
    other, other_opt = trained(seed=1)  # different values everywhere
    full = opt.state_dict()
    for part in cut(other, 2):
        state = from_pieces(pieces, part.module, part.names)
        part.module.load_state_dict(state["module"])
        expected = optimizer_slice(full, part.offset, part.n_tensors)
        assert state["optimizer"]["state"].keys() == expected["state"].keys()
        for i, s in expected["state"].items():
            assert torch.equal(state["optimizer"]["state"][i]["momentum_buffer"],
                               s["momentum_buffer"])
        assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


def test_the_whole_model_and_optimizer_assembled_from_the_parts():
    model, opt = trained()
    empty = copy.deepcopy(model)
    for t in empty.state_dict().values():
        t.zero_()
    out = from_parts(empty, pieces_of(model, opt, 3), "here")
    for name, value in model.state_dict().items():
        assert torch.equal(out["model"][name], value), name
    whole = opt.state_dict()
    assert out["optimizer"]["state"].keys() == whole["state"].keys()
    for i, s in whole["state"].items():
        assert torch.equal(out["optimizer"]["state"][i]["momentum_buffer"],
                           s["momentum_buffer"])
    # It loads as the optimizer a single process builds.
    build_optimizer(digits_config(mode="single"), model).load_state_dict(out["optimizer"])


def test_a_missing_tensor_is_one_clear_error():
    model, opt = trained()
    pieces = pieces_of(model, opt, 3)
    part = cut(model, 3)[2]
    with pytest.raises(CheckpointError, match="pieces lack layer"):
        from_pieces(pieces[:2], part.module, part.names)


def test_a_written_part_says_whether_its_values_are_finite(tmp_path):
    model, opt = trained()
    part = cut(model, 2)[1]
    state = {"module": part.module.state_dict(), "optimizer": None}
    assert write_part(state, part.module, part.names, tmp_path / "a.pt") == {"finite": True}
    read = load_checkpoint(tmp_path / "a.pt")["part"]
    # Named by unit, not by place in the part: "<unit>.<name in the unit>".
    assert {k.split(".")[0] for k in read["module"]} <= {n.split(".")[0] for n in part.names}
    assert any(k.startswith("head.") for k in read["module"])
    assert torch.equal(read["module"][f"{part.names[0]}.conv1.weight"],
                       part.module[0].conv1.weight)
    next(part.module.parameters()).data[0] = float("nan")
    assert write_part(state, part.module, part.names, tmp_path / "b.pt") == {"finite": False}


def test_a_partition_host_draws_its_part_as_the_whole_model_and_checks_it():
    # The meta part, initialized by name where it runs, equals the whole model's part.
    config = digits_config(mode="single")
    torch.manual_seed(3)
    whole = create_model("resnet20", num_classes=10, in_chans=1)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = create_model("resnet20", num_classes=10, in_chans=1)
    threads = torch.get_num_threads()
    try:
        for part, meta_part in zip(cut(whole, 3), cut(meta, 3)):
            host = StageHost(part.index, 3, meta_part.module, config, threads, "cpu",
                             build_optimizer, (part.names, meta.init_seed, meta.init_rule))
            got = host.stage.module.state_dict()
            for name, value in part.module.state_dict().items():
                assert torch.equal(got[name], value), (part.index, name)
            assert host.finite()
            next(host.stage.module.parameters()).data.view(-1)[0] = float("inf")
            assert not host.finite()
    finally:
        torch.set_num_threads(threads)
