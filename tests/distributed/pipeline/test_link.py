"""Collective hand-offs without Ray: the messages' framing, and stages in processes of their
own handing on through a gloo process group (`link.Link`) computing exactly what the driver's
schedule computes in one process."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distbelief.distributed.pipeline.link import HEADER, Link, allocate, header, on_wire, tag
from distbelief.distributed.pipeline.relay import relay_step
from distbelief.distributed.pipeline.schedule import micro_batches, stage_order

from tests.distributed.pipeline.test_relay import stages_of
from tests.distributed.pipeline.test_schedule import data, mlp, pipeline_of


@pytest.mark.parametrize("value", [torch.randn(16, 32, 8, 8), torch.randn(5, 10),
                                   torch.randn(3, 4).to(torch.bfloat16),
                                   torch.randn(2, 1, 3, dtype=torch.float64)])
def test_a_header_allocates_the_tensor_it_describes(value):
    head = header(value)
    assert head.shape == (HEADER,) and head.dtype == torch.int64
    empty = allocate(head)
    assert (empty.shape, empty.dtype) == (value.shape, value.dtype)


def test_a_received_tensor_is_written_through_its_wire_view():
    # The receiver hands gloo `on_wire(value)` to fill: it must be `value`'s own storage
    # (a copy would leave the tensor the stage reads empty), bfloat16 as its 16 bits.
    for dtype in (torch.float32, torch.bfloat16):
        value = torch.zeros(3, 2, dtype=dtype)
        wire = on_wire(value)
        wire.copy_(on_wire(torch.full((3, 2), 1.5, dtype=dtype)))
        assert torch.equal(value, torch.full((3, 2), 1.5, dtype=dtype))
        assert wire.dtype == (torch.int16 if dtype == torch.bfloat16 else dtype)


def test_every_message_of_a_step_has_a_tag_of_its_own():
    tags = [tag(kind, m) + part for kind in "FB" for m in range(16) for part in (0, 1)]
    assert len(set(tags)) == len(tags)


def test_what_no_header_can_describe_is_refused():
    with pytest.raises(ValueError, match="7 dimensions"):
        header(torch.zeros([1] * 7))
    with pytest.raises(ValueError, match="complex"):
        header(torch.zeros(2, dtype=torch.complex64))


# --- stages in processes of their own ------------------------------------------------------

PARTS, MICRO, STEPS = 3, 4, 2


def _stage_process(rank: int, store: str, out: str, schedule: str, ahead: int) -> None:
    """Stage `rank` of an MLP cut in PARTS, in a gloo group with the others: STEPS training
    steps through `relay_step` over a `Link`; its part's state and losses saved to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=PARTS, timeout=datetime.timedelta(seconds=60))
    try:
        stage = stages_of(mlp().double(), PARTS)[rank]
        link, results = Link(rank), []
        for step, (x, y) in enumerate(data(STEPS, (3, 4, 4), 16)):
            parts = micro_batches(x.double(), y, MICRO)
            results.append(relay_step(
                stage, link, link.send, step, stage_order(schedule, rank, PARTS, MICRO, ahead),
                fused=schedule == "1f1b", inputs=[p[0] for p in parts],
                labels=[p[1] for p in parts], weights=[p[2] for p in parts], lr=0.1))
        link.begin(STEPS)  # the last step's sends, done
        torch.save({"state": stage.module.state_dict(), "losses": results}, out)
    finally:
        dist.destroy_process_group()


def _run(rank: int, store: str, folder: str, schedule: str, ahead: int) -> None:
    _stage_process(rank, store, os.path.join(folder, f"stage-{rank}.pt"), schedule, ahead)


@pytest.mark.subprocess
@pytest.mark.parametrize("schedule,ahead", [("1f1b", 1),
                                            pytest.param("gpipe", 0, marks=pytest.mark.slow)])
def test_stages_in_processes_equal_the_drivers_schedule(tmp_path, schedule, ahead):
    mp.spawn(_run, args=(str(tmp_path / "store"), str(tmp_path), schedule, ahead),
             nprocs=PARTS)
    reference = mlp().double()
    driver, _ = pipeline_of(reference, PARTS, MICRO, schedule, ahead=ahead)
    expected = [driver.step(x.double(), y, 0.1) for x, y in data(STEPS, (3, 4, 4), 16)]
    saved = [torch.load(tmp_path / f"stage-{p}.pt") for p in range(PARTS)]
    # The parts' tensors, in order, are the model's (a part is a run of its layers), each
    # equal to the reference's (float64: the same operations; the sums may come in another
    # order).
    values = [v for part in saved for v in part["state"].values()]
    expected_values = list(reference.state_dict().values())
    assert len(values) == len(expected_values)
    for value, want in zip(values, expected_values):
        torch.testing.assert_close(value, want, rtol=0, atol=1e-12)
    losses = saved[-1]["losses"]
    assert [sum(v for v, _ in step) for step in losses] == pytest.approx(
        [loss for loss, _ in expected], abs=1e-12)
    assert all(part["losses"] == [[], []] for part in saved[:-1])
