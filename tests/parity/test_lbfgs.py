"""The L-BFGS core on local tensors against torch.optim.LBFGS, iterate for iterate."""

import math

import pytest
import torch
import torch.nn.functional as F

from distbelief.optim.lbfgs import LBFGS, FunctionObjective, LocalStore, cubic_interpolate


def mlp_problem(seed=0, n=200, d=10, h=8, k=3, wd=1e-3):
    """A small tanh MLP with softmax loss and L2 on random data: smooth and non-convex, so the
    line search brackets and zooms. Returns (f(x) -> loss tensor, x0)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    sizes = [(h, d), (h,), (k, h), (k,)]
    x0 = torch.cat([torch.randn(*s, generator=g, dtype=torch.float64).reshape(-1) * 0.5
                    for s in sizes])

    def f(x):
        parts, i = [], 0
        for s in sizes:
            m = math.prod(s)
            parts.append(x[i:i + m].view(s))
            i += m
        w1, b1, w2, b2 = parts
        logits = torch.tanh(X @ w1.T + b1) @ w2.T + b2
        return F.cross_entropy(logits, y) + wd / 2 * x.dot(x)

    return f, x0


def rosenbrock_problem():
    """The extended Rosenbrock function from its classic start: its curved valley makes the
    line search bracket and zoom."""
    x0 = torch.zeros(10, dtype=torch.float64)
    x0[::2], x0[1::2] = -1.2, 1.0
    return (lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()), x0


def with_grad(f):
    def fn(x):
        x = x.detach().requires_grad_(True)
        loss = f(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad
    return fn


def torch_iterates(f, x0, steps, **options):
    p = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], max_iter=1, max_eval=26, **options)

    def closure():
        opt.zero_grad()
        loss = f(p)
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(p.detach().clone())
    return out, opt.state[p]["func_evals"]


def our_iterates(f, x0, steps, history, lr=1.0, line_search="strong_wolfe"):
    store = LocalStore()
    store.run([("set", "x", x0)])
    opt = LBFGS(store, FunctionObjective(with_grad(f)), history=history, lr=lr,
                line_search=line_search)
    opt.start()
    out, records = [], []
    for _ in range(steps):
        records.append(opt.step())
        out.append(store.read("x"))
    return out, opt, store, records


@pytest.mark.parametrize("problem,line_search,lr,history", [
    (rosenbrock_problem, "strong_wolfe", 1.0, 5), (mlp_problem, "strong_wolfe", 1.0, 100),
    (mlp_problem, "none", 0.5, 4)])
def test_iterates_match_torch_lbfgs(problem, line_search, lr, history):
    f, x0 = problem()
    steps = 25
    ours, opt, _, records = our_iterates(f, x0, steps, history, lr, line_search)
    theirs, torch_evals = torch_iterates(
        f, x0, steps, history_size=history, lr=lr,
        line_search_fn=None if line_search == "none" else line_search)
    for k, (a, b) in enumerate(zip(ours, theirs), 1):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), f"iteration {k}"
    assert records[-1]["loss"] == pytest.approx(float(f(ours[-1])), rel=1e-12)
    assert not any(r["converged"] for r in records)
    if line_search == "strong_wolfe":
        # Same trials: torch evaluates once per step() plus its line-search trials, we once
        # at the start plus ours.
        assert opt.evals == torch_evals - steps + 1
        if problem is rosenbrock_problem:
            assert any(r["evals"] > 1 for r in records), "the line search should zoom"


def test_float32_iterates_stay_within_tolerance_of_torch():
    f64, x64 = mlp_problem(seed=1)
    f = lambda x: f64(x.double()).float()  # noqa: E731
    x0 = x64.float()
    ours, *_ = our_iterates(f, x0, 20, history=10)
    theirs, _ = torch_iterates(f, x0, 20, history_size=10, line_search_fn="strong_wolfe")
    assert (ours[-1] - theirs[-1]).abs().max() <= 1e-5 * max(1.0, theirs[-1].abs().max())


def test_store_holds_a_bounded_number_of_vectors():
    f, x0 = mlp_problem(seed=2)
    _, opt, store, _ = our_iterates(f, x0, 30, history=3)
    names = set(store.vectors.slots)
    assert {"x", "g", "d", "g_prev"} <= names
    assert len(names) <= 4 + 2 * 3, sorted(names)
    assert len(opt.pairs) == 3


def test_quadratic_converges_and_stops():
    A = torch.diag(torch.linspace(1, 50, 20, dtype=torch.float64))
    b = torch.linspace(-1, 1, 20, dtype=torch.float64)
    x_star = torch.linalg.solve(A, b)
    f = lambda x: 0.5 * x @ A @ x - b @ x  # noqa: E731
    ours, opt, store, records = our_iterates(f, torch.zeros(20, dtype=torch.float64), 60, 10)
    assert opt.converged is not None
    assert torch.allclose(store.read("x"), x_star, atol=1e-4)
    last = records[-1]
    assert opt.step() == {"iteration": opt.n_iter, "loss": opt.loss, "converged": opt.converged}
    assert last["converged"] == opt.converged


class TwoBatches(FunctionObjective):
    """Alternates between two quadratics with the same minimizer, as batches would."""

    def __init__(self, fns):
        self.fns, self.k, self.changes = fns, 0, 0
        super().__init__(lambda x: self.fns[self.k % 2](x))

    def advance(self):
        self.k += 1
        self.changes += 1
        return True


def test_a_new_batch_takes_the_curvature_pair_on_the_old_one():
    x_star = torch.linspace(-2, 2, 12, dtype=torch.float64)
    fns = []
    for scale in (torch.linspace(1, 10, 12), torch.linspace(10, 1, 12)):
        A = torch.diag(scale.double())
        fns.append(with_grad(lambda x, A=A: 0.5 * (x - x_star) @ A @ (x - x_star)))
    objective = TwoBatches(fns)
    store = LocalStore()
    store.run([("set", "x", torch.zeros(12, dtype=torch.float64))])
    opt = LBFGS(store, objective, history=5)
    opt.start()
    for _ in range(40):
        record = opt.step()
        if record["converged"]:
            break
        # After a batch change "g" is the gradient of the new batch at x.
        assert torch.allclose(store.read("g"), fns[objective.k % 2](store.read("x"))[1])
        assert "batch_loss" in record
    assert torch.allclose(store.read("x"), x_star, atol=1e-5)
    # Every stored pair has positive curvature (pairs mixing batches could have none).
    assert all(ro > 0 for _, _, ro in opt.pairs)


def test_cubic_interpolation_finds_the_minimum_of_a_cubic():
    c = lambda t: (t - 1.5) ** 2 * (t + 3)  # noqa: E731  local minimum at 1.5
    dc = lambda t: 2 * (t - 1.5) * (t + 3) + (t - 1.5) ** 2  # noqa: E731
    assert cubic_interpolate(0.0, c(0.0), dc(0.0), 2.0, c(2.0), dc(2.0)) == pytest.approx(1.5)
    assert cubic_interpolate(0.0, c(0.0), dc(0.0), 2.0, c(2.0), dc(2.0), bounds=(0, 1)) == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="line search"):
        LBFGS(LocalStore(), None, line_search="armijo")
    with pytest.raises(ValueError, match="history"):
        LBFGS(LocalStore(), None, history=0)
    with pytest.raises(RuntimeError, match="start"):
        LBFGS(LocalStore(), None).step()
