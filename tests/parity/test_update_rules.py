"""Downpour's update rules on flat vectors equal torch.optim's SGD and Adagrad, step for step."""

import pytest
import torch

from distbelief.optim import ADAGRAD_EPS, adagrad_update, sgd_update


def _gradients(steps, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 1e-4), (0.0, 0.0), (0.5, 5e-4)])
def test_sgd_update_matches_torch_sgd(momentum, weight_decay, nesterov):
    if nesterov and not momentum:
        return
    w0 = torch.randn(50)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    w, v = w0.clone(), None
    for i, g in enumerate(_gradients(6, 50)):
        lr = 0.1 if i < 3 else 0.01
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        v = sgd_update(w, g, v, lr, momentum, weight_decay, nesterov)
    assert torch.equal(w, p.detach())


def test_adagrad_update_matches_torch_adagrad():
    w0 = torch.randn(50)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([p], lr=0.5, weight_decay=1e-3, eps=ADAGRAD_EPS)
    w, h = w0.clone(), torch.zeros(50)
    for g in _gradients(6, 50):
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
