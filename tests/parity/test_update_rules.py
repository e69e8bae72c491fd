"""Downpour's update rules on flat vectors equal torch.optim's SGD and Adagrad, step for step."""

import pytest
import torch

from distbelief.optim import ADAGRAD_EPS, CHUNK, adagrad_update, sgd_update

# Longer than one chunk of the fused updates, and not a multiple of it.
SIZES = [50, 3 * CHUNK + 7]


def _gradients(steps, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 1e-4), (0.0, 0.0), (0.5, 5e-4)])
@pytest.mark.parametrize("n", SIZES)
def test_sgd_update_matches_torch_sgd(momentum, weight_decay, nesterov, n):
    if nesterov and not momentum:
        return
    w0 = torch.randn(n)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    w, v = w0.clone(), None
    for i, g in enumerate(_gradients(6, n)):
        lr = 0.1 if i < 3 else 0.01
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        v = sgd_update(w, g, v, lr, momentum, weight_decay, nesterov)
    assert torch.equal(w, p.detach())


@pytest.mark.parametrize("n", SIZES)
def test_adagrad_update_matches_torch_adagrad(n):
    w0 = torch.randn(n)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([p], lr=0.5, weight_decay=1e-3, eps=ADAGRAD_EPS)
    w, h = w0.clone(), torch.zeros(n)
    for g in _gradients(6, n):
        p.grad = g.clone()
        opt.step()
        adagrad_update(w, g, h, 0.5, 1e-3)
    torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-7)


def test_adagrad_step_is_gamma_over_root_sum_of_squares():
    w, h = torch.zeros(2), torch.zeros(2)
    adagrad_update(w, torch.tensor([3.0, -4.0]), h, 1.0, 0.0)
    adagrad_update(w, torch.tensor([4.0, 3.0]), h, 1.0, 0.0)
    # h = [25, 25]; the second step moves by gamma * g / 5.
    torch.testing.assert_close(h, torch.tensor([25.0, 25.0]))
    torch.testing.assert_close(w, torch.tensor([-1 - 0.8, 1 - 0.6]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_update_takes_a_low_precision_gradient_as_its_float32_value(dtype):
    w0, g = torch.randn(2 * CHUNK + 3), torch.randn(2 * CHUNK + 3).to(dtype)
    w, expected = w0.clone(), w0.clone()
    v = sgd_update(w, g, None, 0.1, 0.9, 1e-4, True)
    v_expected = sgd_update(expected, g.float(), None, 0.1, 0.9, 1e-4, True)
    sgd_update(w, g, v, 0.1, 0.9, 1e-4, True)
    sgd_update(expected, g.float(), v_expected, 0.1, 0.9, 1e-4, True)
    assert torch.equal(w, expected) and w.dtype == torch.float32
