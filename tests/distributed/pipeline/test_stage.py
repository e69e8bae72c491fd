"""Stages in process: the pipeline of P stages computes what one process computes (M = 1, with
BatchNorm), and with M micro-batches on a BatchNorm-free model the accumulated gradients are
the whole batch's."""

import copy

import pytest
import torch
from torch import nn

from distbelief.distributed.pipeline.partition import partition
from distbelief.distributed.pipeline.schedule import local_pipeline, micro_batches
from distbelief.distributed.pipeline.stage import Stage, optimizer_join, optimizer_slice
from distbelief.engine.losses import get_loss
from distbelief.models import create_model


def sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def stages_of(model, parts, sample):
    plan = partition(model, parts, sample)
    loss = get_loss("cross_entropy")
    return [Stage(p.index, parts, p.module, loss, sgd(p.module) if p.params else None)
            for p in plan.parts], plan


def reference_steps(model, batches, lr):
    opt, loss = sgd(model), get_loss("cross_entropy")
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()


def batches(n, shape, classes=10, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,),
                                                                   generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("parts", [2, 3])
def test_stages_equal_one_process_with_batchnorm(parts):
    model = create_model("resnet20", num_classes=10)
    reference = copy.deepcopy(model)
    data = batches(3, (3, 16, 16))
    stages, _ = stages_of(model, parts, data[0][0][:1])
    pipeline = local_pipeline(stages, micro=1)
    for x, y in data:
        loss, wrong = pipeline.step(x, y, 0.1)
    reference_steps(reference, data, 0.1)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert 0 <= wrong <= 16 and loss > 0


def test_micro_batches_accumulate_the_whole_batch_gradient():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 32),
                          nn.Tanh(), nn.Linear(32, 10))
    reference = copy.deepcopy(model)
    data = batches(3, (3, 4, 4), size=18)  # 18 images in 4 micro-batches: uneven slices
    stages, _ = stages_of(model, 3, data[0][0][:1])
    pipeline = local_pipeline(stages, micro=4)
    for x, y in data:
        pipeline.step(x, y, 0.1)
    reference_steps(reference, data, 0.1)
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_micro_batches_are_weighted_by_size():
    x, y = torch.randn(10, 2), torch.arange(10)
    parts = micro_batches(x, y, 4)
    assert [len(ym) for _, ym, _ in parts] == [3, 3, 2, 2]
    assert sum(w for _, _, w in parts) == pytest.approx(1.0)
    assert len(micro_batches(x[:2], y[:2], 4)) == 2  # never an empty micro-batch


def test_a_stage_holds_only_its_own_parameters():
    model = create_model("resnet20", num_classes=10)
    stages, plan = stages_of(model, 3, torch.zeros(1, 3, 32, 32))
    owned = [{id(p) for p in s.module.parameters()} for s in stages]
    for i, mine in enumerate(owned):
        others = set().union(*(o for j, o in enumerate(owned) if j != i))
        assert not mine & others
        assert mine == {id(p) for p in stages[i].optimizer.param_groups[0]["params"]}


def test_optimizer_state_moves_between_whole_and_parts():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = sgd(model)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    full = opt.state_dict()
    plan = partition(model, 2, torch.zeros(1, 4))
    slices = [optimizer_slice(full, p.offset, p.n_tensors) for p in plan.parts]
    assert [sorted(s["state"]) for s in slices] == [[0, 1], [0, 1, 2, 3]]
    joined = optimizer_join(slices, [p.offset for p in plan.parts], full)
    assert sorted(joined["state"]) == sorted(full["state"])
    for i in full["state"]:
        assert torch.equal(joined["state"][i]["momentum_buffer"],
                           full["state"][i]["momentum_buffer"])
    assert joined["param_groups"][0]["momentum"] == 0.9


def test_bfloat16_activations_travel_in_their_own_dtype():
    # Under --bf16 a stage's output is bfloat16: it travels as its 2-byte bits (not widened to
    # float32), and arrives as the same bfloat16 values.
    pytest.importorskip("ray")
    from distbelief.distributed.pipeline.actors import Bits16, handed_on, received

    out = torch.randn(4, 8).to(torch.bfloat16)
    sent = handed_on(out)
    assert isinstance(sent, Bits16) and sent.bits.nbytes == 4 * 8 * 2
    arrived = received(sent)
    assert arrived.dtype == torch.bfloat16 and torch.equal(arrived, out)
    plain = handed_on(torch.ones(3))
    assert plain.dtype.name == "float32" and torch.equal(received(plain), torch.ones(3))
