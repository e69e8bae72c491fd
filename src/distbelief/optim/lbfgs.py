"""L-BFGS written once over a vector store, so that the same code runs on local tensors and on
parameter-server shards (Sandblaster L-BFGS, Dean et al., 2012).

The optimizer never touches a parameter-sized vector. It holds scalars (losses, step sizes,
the history's 1/(y.s) and the initial Hessian scale) and names of vectors that live in a
*store*, and it drives them with small commands, each executed on every slice of every vector:

    ("set", dst, tensor)                  dst = tensor (a full vector; a sharded store slices it)
    ("copy", dst, src)                    dst = src
    ("scale", dst, a, src)                dst = a * src
    ("axpy", dst, a, x)                   dst += a * x
    ("lincomb", dst, a, x, b, y)          dst = a * x + b * y
    ("zero", dst, like)                   dst = zeros shaped like `like`
    ("free", name)                        forget name
    ("dot", x, y)        -> float         sum of x * y          (slices' results are added)
    ("abssum", x)        -> float         sum of |x|            (added)
    ("absmax", x)        -> float         max of |x|            (maximum)

`store.run(commands)` executes a list in order in one round trip and returns the results of the
reducing commands (the last three) in order; `store.read(name)` returns a whole vector (tests,
checkpoints). The objective evaluates f at the store's "x" and writes its gradient into a named
vector; the commands that must precede and follow an evaluation travel with it, so a line-search
trial costs one round trip to the shards before and one after the gradient computation.

The algorithm is torch.optim.LBFGS's, step for step (two-loop recursion over the last
`history` pairs, initial Hessian scale y.s / y.y, pairs with y.s <= 1e-10 skipped, first step
min(1, 1/|g|_1) * lr, the strong-Wolfe line search with cubic interpolation or a fixed step), so
the iterates can be checked against it. One call of `step()` is one iteration.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol

import torch

# How each reducing command's per-slice results combine into one number.
REDUCE = {"dot": sum, "abssum": sum, "absmax": max}
LINE_SEARCHES = ("strong_wolfe", "none")


class VectorSlots:
    """Named tensors (whole vectors or one shard's slices of them) and the command executor.

    `execute` returns the per-slice partial results of the reducing commands; a store combines
    them over slices with `REDUCE`."""

    reduce = REDUCE  # the reducing commands (a subclass may add its own)

    def __init__(self):
        self.slots: dict[str, torch.Tensor] = {}
        # Freed and overwritten tensors, reused as destinations: at 25M parameters a fresh
        # 100 MB tensor costs more in page faults than the arithmetic written into it.
        self.pool: list[torch.Tensor] = []

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        for i, t in enumerate(self.pool):
            if t.shape == like.shape and t.dtype == like.dtype:
                return self.pool.pop(i)
        return torch.empty_like(like)

    def _store(self, name: str, value: torch.Tensor) -> None:
        """Bind `name` to `value`; the tensor it held goes to the pool. Results are always
        computed into a buffer that is not a source, so a name may be among its own sources."""
        old = self.slots.get(name)
        self.slots[name] = value
        if old is not None and all(old is not t for t in self.slots.values()):
            self.pool.append(old)

    def execute(self, commands: list[tuple]) -> list[float]:
        out = []
        for command in commands:
            result = self.apply(command)
            if command[0] in self.reduce:
                out.append(result)
        return out

    @torch.no_grad()
    def apply(self, command: tuple):
        op, *args = command
        v = self.slots
        if op == "set":
            self._store(args[0], self._buffer(args[1]).copy_(args[1]))
        elif op == "copy":
            self._store(args[0], self._buffer(v[args[1]]).copy_(v[args[1]]))
        elif op == "scale":
            src = v[args[2]]
            self._store(args[0], torch.mul(src, args[1], out=self._buffer(src)))
        elif op == "axpy":
            v[args[0]].add_(v[args[2]], alpha=args[1])
        elif op == "lincomb":
            dst, a, x, b, y = args
            out = self._buffer(v[x])
            if a == 1:
                torch.add(v[x], v[y], alpha=b, out=out)
            else:
                torch.mul(v[x], a, out=out).add_(v[y], alpha=b)
            self._store(dst, out)
        elif op == "zero":
            self._store(args[0], self._buffer(v[args[1]]).zero_())
        elif op == "free":
            old = v.pop(args[0], None)
            if old is not None:
                self.pool.append(old)
        elif op == "dot":
            return float(torch.dot(v[args[0]], v[args[1]]))
        elif op == "abssum":
            return float(torch.linalg.vector_norm(v[args[0]], 1))
        elif op == "absmax":
            x = v[args[0]]
            if not x.numel():
                return 0.0
            low, high = torch.aminmax(x)  # one pass, no |x| temporary (6x faster at 12M)
            return max(-float(low), float(high))
        else:
            raise ValueError(f"unknown vector command {op!r}")
        return None


class VectorStore(Protocol):
    def run(self, commands: list[tuple]) -> list[float]: ...

    def read(self, name: str) -> torch.Tensor: ...


class LocalStore:
    """A store of whole vectors in this process: the reference the sharded store must match."""

    def __init__(self):
        self.vectors = VectorSlots()

    def run(self, commands: list[tuple]) -> list[float]:
        return self.vectors.execute(commands)

    def read(self, name: str) -> torch.Tensor:
        return self.vectors.slots[name].clone()


class Objective(Protocol):
    def evaluate(self, store: VectorStore, prepare: list[tuple], grad: str,
                 then: list[tuple]) -> tuple[float, list[float]]:
        """Run `prepare`, evaluate f at the store's "x" and write its gradient to `grad`, run
        `then`; return (f, results of the reducing commands in `then`)."""

    def advance(self) -> bool:
        """Move to the next batch after an iteration; True when the objective changed."""


class FunctionObjective:
    """An objective given as a function of the whole parameter vector: fn(x) -> (f, gradient).
    Reads x from the store and writes the gradient back: for local stores and tests."""

    def __init__(self, fn):
        self.fn = fn

    def evaluate(self, store, prepare, grad, then):
        store.run(prepare)
        f, g = self.fn(store.read("x"))
        return float(f), store.run([("set", grad, g)] + then)

    def advance(self) -> bool:
        return False


def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None) -> float:
    """Minimizer of the cubic through (x1, f1, slope g1) and (x2, f2, slope g2), clamped to
    `bounds` (default [min(x1, x2), max(x1, x2)]); the bounds' middle if it has none."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square < 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(d2_square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(at, lo), hi)


class LBFGS:
    """L-BFGS on `objective` over the vectors of `store`; the parameters are the store's "x".

    `start()` evaluates the objective at x; each `step()` is one iteration and returns its
    record: loss (at the new x), grad_norm (L2) and grad_max, step (the step size t along the
    direction), evals (objective evaluations it took), and `converged` (None, or why the
    optimization is over: the same tests as torch.optim.LBFGS with its default tolerances).

    Vectors it keeps in the store: x, g (gradient at x), d (direction), g_prev, and the history
    pairs s_k, y_k; a line search adds x0 and its trial gradients while it runs.
    """

    def __init__(self, store: VectorStore, objective: Objective, history: int = 10,
                 lr: float = 1.0, line_search: str = "strong_wolfe",
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, max_ls: int = 25):
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"line search {line_search!r}: choose {' or '.join(LINE_SEARCHES)}")
        if history < 1:
            raise ValueError(f"history must be positive, got {history}")
        self.store, self.objective = store, objective
        self.history, self.lr, self.line_search = history, lr, line_search
        self.tolerance_grad, self.tolerance_change, self.max_ls = \
            tolerance_grad, tolerance_change, max_ls
        self.n_iter = 0
        self.evals = 0
        self.loss: float | None = None
        self.grad_max = math.inf
        self.pairs: list[tuple[str, str, float]] = []  # (s name, y name, 1 / y.s), oldest first
        self.h_diag = 1.0
        self.t = 0.0
        self.pair_ready = False  # the pair of the last step is in `pairs` already (batch change)
        self.converged: str | None = None
        self._names = 0
        self._trash: list[tuple] = []  # frees to send with the next commands

    # --- bookkeeping ---------------------------------------------------------------------

    def _fresh(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def _run(self, commands: list[tuple]) -> list[float]:
        commands, self._trash = self._trash + commands, []
        return self.store.run(commands)

    def _evaluate(self, prepare: list[tuple], grad: str, then: list[tuple]):
        prepare, self._trash = self._trash + prepare, []
        self.evals += 1
        return self.objective.evaluate(self.store, prepare, grad, then)

    def state_dict(self) -> dict:
        """The optimizer's scalars and vector names (the vectors stay in the store), copied:
        later steps do not change it."""
        return copy.deepcopy({k: getattr(self, k) for k in (
            "n_iter", "evals", "loss", "grad_max", "pairs", "h_diag", "t", "pair_ready",
            "converged", "_names", "_trash")})

    def load_state_dict(self, state: dict) -> None:
        for k, v in copy.deepcopy(state).items():
            setattr(self, k, v)

    # --- the algorithm -------------------------------------------------------------------

    def start(self) -> dict:
        """Evaluate f and its gradient at x (into "g"); returns the record of iteration 0."""
        self.loss, (self.grad_max, gg) = self._evaluate(
            [], "g", [("absmax", "g"), ("dot", "g", "g")])
        if self.grad_max <= self.tolerance_grad:
            self.converged = "gradient below tolerance"
        return {"iteration": 0, "loss": self.loss, "grad_norm": math.sqrt(gg),
                "grad_max": self.grad_max, "step": 0.0, "evals": 1, "converged": self.converged}

    def _update_history(self) -> None:
        """Add the pair (s, y) = (t d, g - g_prev) of the last step, unless y.s <= 1e-10."""
        s, y = self._fresh("s"), self._fresh("y")
        ys, yy = self._run([("lincomb", y, 1.0, "g", -1.0, "g_prev"), ("scale", s, self.t, "d"),
                            ("dot", y, s), ("dot", y, y)])
        if ys > 1e-10:
            if len(self.pairs) == self.history:
                old_s, old_y, _ = self.pairs.pop(0)
                self._trash += [("free", old_s), ("free", old_y)]
            self.pairs.append((s, y, 1.0 / ys))
            self.h_diag = ys / yy
        else:
            self._trash += [("free", s), ("free", y)]

    def _direction(self, tail: list[tuple]) -> list[float]:
        """d = -H g by the two-loop recursion (one round trip per history pair and loop), then
        `tail`; returns the tail's results."""
        if self.n_iter == 1:
            return self._run([("scale", "d", -1.0, "g")] + tail)
        al = [0.0] * len(self.pairs)
        pending = [("scale", "q", -1.0, "g")]
        for i in reversed(range(len(self.pairs))):
            s, y, ro = self.pairs[i]
            al[i] = self._run(pending + [("dot", s, "q")])[0] * ro
            pending = [("axpy", "q", -al[i], y)]
        pending.append(("scale", "d", self.h_diag, "q"))
        for i, (s, y, ro) in enumerate(self.pairs):
            be = self._run(pending + [("dot", y, "d")])[0] * ro
            pending = [("axpy", "d", al[i] - be, s)]
        return self._run(pending + [("free", "q")] + tail)

    def step(self) -> dict:
        """One iteration: history update, direction, line search or fixed step, new gradient.
        Call `start()` first; once `converged` is set, further calls do nothing."""
        if self.loss is None:
            raise RuntimeError("call start() before step()")
        if self.converged:
            return {"iteration": self.n_iter, "loss": self.loss, "converged": self.converged}
        evals_before = self.evals
        self.n_iter += 1
        if self.n_iter > 1 and not self.pair_ready:
            self._update_history()
        self.pair_ready = False
        tail = [("copy", "g_prev", "g"), ("dot", "g", "d"), ("absmax", "d")]
        if self.n_iter == 1:
            tail.append(("abssum", "g"))
            gtd, d_max, g_sum = self._direction(tail)
            self.t = min(1.0, 1.0 / g_sum) * self.lr
        else:
            gtd, d_max = self._direction(tail)
            self.t = self.lr
        prev_loss = self.loss
        record = {"iteration": self.n_iter}
        if gtd > -self.tolerance_change:
            self.converged = "no descent direction"
            return {**record, "loss": self.loss, "grad_norm": None, "grad_max": self.grad_max,
                    "step": 0.0, "evals": 0, "converged": self.converged}
        measure = [("absmax", "g"), ("dot", "g", "g")]
        if self.line_search == "strong_wolfe":
            self.loss, grad, self.t = self._strong_wolfe(self.t, self.loss, gtd, d_max)
            finish = [("lincomb", "x", 1.0, "x0", self.t, "d"), ("free", "x0")]
            if grad != "g":
                finish += [("copy", "g", grad), ("free", grad)]
            self.grad_max, gg = self._run(finish + measure)
        else:
            self.loss, (self.grad_max, gg) = self._evaluate(
                [("axpy", "x", self.t, "d")], "g", measure)
        record.update(loss=self.loss, grad_norm=math.sqrt(gg), grad_max=self.grad_max,
                      step=self.t, evals=self.evals - evals_before)
        if self.grad_max <= self.tolerance_grad:
            self.converged = "gradient below tolerance"
        elif abs(self.t) * d_max <= self.tolerance_change:
            self.converged = "step below tolerance"
        elif abs(self.loss - prev_loss) < self.tolerance_change:
            self.converged = "loss change below tolerance"
        if not self.converged and self.objective.advance():
            # A new batch: the curvature pair must come from one objective, so it is taken now,
            # on the batch the step was made on, and the gradient is evaluated afresh.
            self._update_history()
            self.pair_ready = True
            self.loss, (self.grad_max, gg) = self._evaluate([], "g", measure)
            record.update(batch_loss=self.loss, evals=self.evals - evals_before)
        record["converged"] = self.converged
        return record

    def _strong_wolfe(self, t: float, f: float, gtd: float, d_max: float,
                      c1: float = 1e-4, c2: float = 0.9) -> tuple[float, str, float]:
        """Line search along d from x0 = x for a step satisfying the strong Wolfe conditions
        (`WolfeSearch`); returns (f, name of the gradient, t) of the point chosen. "x" is left
        at the last trial; the caller sets it to x0 + t d."""
        return WolfeSearch(self, f, gtd, c1, c2).run(t, d_max)


class WolfeSearch:
    """One strong-Wolfe line search of `opt` (an `LBFGS`) from x0 = x along d, where the loss
    is `f` and the slope `gtd`: bracketing, then zoom by cubic interpolation, as
    torch.optim.LBFGS does it (tests/parity/test_lbfgs.py). Each trial evaluates at x0 + t d
    into a fresh gradient vector of the store; vectors no bracket end refers to are freed."""

    def __init__(self, opt: LBFGS, f: float, gtd: float, c1: float, c2: float):
        self.opt, self.f, self.gtd, self.c1, self.c2 = opt, f, gtd, c1, c2
        self.temps: set[str] = set()
        self.first = [("copy", "x0", "x")]  # sent with the first trial
        self.evals = 0  # trials after the first

    def trial(self, t: float) -> tuple[float, str, float]:
        """(f, gradient name, slope along d) at x0 + t d."""
        name = self.opt._fresh("ls")
        self.temps.add(name)
        f_new, (gtd_new,) = self.opt._evaluate(
            self.first + [("lincomb", "x", 1.0, "x0", t, "d")], name, [("dot", name, "d")])
        self.first = []
        return f_new, name, gtd_new

    def keep(self, *live: str) -> None:
        """Free the trial gradients nothing refers to any more."""
        for name in sorted(self.temps - set(live)):
            self.opt._trash.append(("free", name))
            self.temps.discard(name)

    def too_high(self, t: float, f_new: float) -> bool:
        """The sufficient-decrease (Armijo) condition fails (not for a NaN loss, as torch)."""
        return f_new > self.f + self.c1 * t * self.gtd

    def curvature(self, gtd_new: float) -> bool:
        """The strong curvature condition holds."""
        return abs(gtd_new) <= -self.c2 * self.gtd

    def run(self, t: float, d_max: float) -> tuple[float, str, float]:
        bracket, done = self.bracket(t)
        self.keep(*bracket[2])
        return self.zoom(bracket, done, d_max)

    def bracket(self, t: float) -> tuple[list[list], bool]:
        """Grow the step until an interval holds a point meeting the conditions; returns
        ([steps, losses, gradient names, slopes] of the interval's ends, found: one end meets
        them already)."""
        f_new, g_new, gtd_new = self.trial(t)
        t_prev, f_prev, g_prev, gtd_prev = 0.0, self.f, "g", self.gtd
        while self.evals < self.opt.max_ls:
            # The order of the tests matters: a point meeting both Wolfe conditions ends the
            # search even when the slope there is positive.
            armijo_fails = self.too_high(t, f_new) or (self.evals > 1 and f_new >= f_prev)
            if not armijo_fails and self.curvature(gtd_new):
                return [[t], [f_new], [g_new], [gtd_new]], True
            if armijo_fails or gtd_new >= 0:
                return [[t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]], False
            min_step, max_step = t + 0.01 * (t - t_prev), t * 10
            t_prev, t = t, cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                             bounds=(min_step, max_step))
            f_prev, g_prev, gtd_prev = f_new, g_new, gtd_new
            self.keep(g_prev)
            f_new, g_new, gtd_new = self.trial(t)
            self.evals += 1
        return [[0.0, t], [self.f, f_new], ["g", g_new], [self.gtd, gtd_new]], False

    def zoom(self, ends: list[list], done: bool, d_max: float) -> tuple[float, str, float]:
        """Shrink the interval until a point meets the conditions (or the trials run out, or
        it is too narrow to matter); returns (f, gradient name, t) of its best end."""
        bracket, bracket_f, bracket_g, bracket_gtd = ends
        insufficient_progress = False
        low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
        while not done and self.evals < self.opt.max_ls:
            if abs(bracket[1] - bracket[0]) * d_max < self.opt.tolerance_change:
                break
            t, insufficient_progress = zoom_point(bracket, bracket_f, bracket_gtd,
                                                  insufficient_progress)
            f_new, g_new, gtd_new = self.trial(t)
            self.evals += 1
            if self.too_high(t, f_new) or f_new >= bracket_f[low]:
                bracket[high], bracket_f[high] = t, f_new
                bracket_g[high], bracket_gtd[high] = g_new, gtd_new
                low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
            else:
                if self.curvature(gtd_new):
                    done = True
                elif gtd_new * (bracket[high] - bracket[low]) >= 0:  # old low becomes high
                    bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                    bracket_g[high], bracket_gtd[high] = bracket_g[low], bracket_gtd[low]
                bracket[low], bracket_f[low] = t, f_new
                bracket_g[low], bracket_gtd[low] = g_new, gtd_new
            self.keep(*bracket_g)
        self.keep(bracket_g[low])
        return bracket_f[low], bracket_g[low], bracket[low]


def zoom_point(bracket: list[float], bracket_f: list[float], bracket_gtd: list[float],
               insufficient_progress: bool) -> tuple[float, bool]:
    """The zoom phase's next trial step in the bracket (cubic interpolation of its ends), and
    whether it made insufficient progress. A trial too close to an end of the bracket makes
    little progress: after two such trials (or one outside the bracket) it is moved to 0.1 of
    the bracket's width inside."""
    t = cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                          bracket[1], bracket_f[1], bracket_gtd[1])
    top, bottom = max(bracket), min(bracket)
    eps = 0.1 * (top - bottom)
    if min(top - t, t - bottom) >= eps:
        return t, False
    if insufficient_progress or t >= top or t <= bottom:
        return (top - eps if abs(t - top) < abs(t - bottom) else bottom + eps), False
    return t, True
