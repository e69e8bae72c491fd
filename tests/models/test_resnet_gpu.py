"""The models on CUDA, in the settings the engine offers there: channels_last and bf16 autocast."""

import pytest
import torch

from distbelief.models import create_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_cuda_channels_last_bf16_matches_cpu(name):
    model = create_model(name).eval()
    size = 32 if name == "resnet56" else 224
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        gpu = model.cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(x.cuda().to(memory_format=torch.channels_last)).float().cpu()
    # bf16 keeps 8 bits of mantissa: compare the predictions and a loose tolerance.
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


def test_cuda_training_step_updates_every_parameter():
    model = create_model("resnet20").cuda().to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
