"""How a Downpour shard applies a stale gradient. Plain Python: no Ray here.

A push's staleness tau is the number of updates the shard applied between the version the
gradient was computed from and its arrival (`ParameterShard.push`). The recipe's rule (SGD with
momentum, or Adagrad) is then applied with one of these corrections, `--staleness-rule`:

- ``none``: the gradient as if it were fresh (Dean et al., 2012).
- ``lr``: the step divided by the gradient's staleness, lr / max(1, tau) (Zhang et al., 2016,
  "Staleness-aware Async-SGD for Distributed Deep Learning").
- ``momentum``: asynchrony acts as momentum of its own, about 1 - 1/N with N workers
  (Mitliagkas et al., 2016, "Asynchrony begets momentum"). With the measured mean staleness
  tau_bar (N - 1 in their queueing model) that is tau_bar / (tau_bar + 1); the shard applies
  momentum max(0, momentum - tau_bar / (tau_bar + 1)), so that explicit and implicit momentum
  together stay near the recipe's. tau_bar is a moving average over this shard's pushes that
  starts at N - 1.
- ``dc``: delay compensation (Zheng et al., 2017, DC-ASGD-a): the gradient is corrected by a
  diagonal Taylor term to the parameters it is applied to,
  g + lambda_t * g * g * (w_now - w_fetched), with the adaptive
  lambda_t = --dc-lambda / sqrt(MeanSquare(g)), MeanSquare a moving average of g * g per element
  (decay DC_MEAN_SQUARE_DECAY). A constant lambda does nothing with minibatch-mean gradients
  (g * g ~ 1e-4); the adaptive one scales the term to the gradient's own size. The shard keeps
  the values each replica fetched, by version, until that replica pushes from a later one.
- ``dana``: each replica's gradients go into a momentum of its own, and a replica fetches the
  parameters looked ahead by every replica's momentum, where the server will be when the
  replicas' next gradients arrive if they were zero (Hakimi et al., 2019, "Taming Momentum in a
  Distributed Asynchronous Environment", DANA-Zero): w - lr * momentum * sum_j s_j * v_j, s_j
  the lr factor of replica j's last step (1 / its staleness under ``lr``, else 1), so the
  look-ahead goes as far as the steps the shard will actually take. The recipe's momentum is
  used unchanged; with one replica this is Nesterov's momentum. The shard holds replicas + 1
  momentum vectors instead of one; `retire(j)` takes a replica that is gone out of the sum.
- ``dana-slim`` (DANA-Slim, same paper): the same algorithm with the momentum on the replicas.
  A replica keeps its v_j, and pushes d + momentum * v_j (v_j = momentum * v_j + d, d the
  gradient plus weight decay at the parameters it fetched); the shard takes one plain SGD step
  per push (no momentum, no weight decay, no per-replica state, no look-ahead pass), and what
  it holds is DANA-Zero's look-ahead point itself. Equal to ``dana`` in lockstep (up to where
  weight decay is taken, and the look-ahead's lr at a schedule milestone); the replica side is
  `SlimMomentum`.

The default is ``dana+lr``: on CIFAR-10 dana is the only rule that keeps two replicas near the
single process at equal minibatches (staleness ~1, where lr changes nothing), and lr keeps it
stable where staleness runs higher than the look-ahead foresees (small models whose round
trips are as long as their steps: staleness ~5, where dana alone diverged).

Rules combine with "+" (``momentum+lr``: both corrections; ``dana`` and ``dana-slim`` take
``lr`` only). Adagrad takes ``lr`` (its gamma is divided) and ``dc``; ``momentum``, ``dana`` and
``dana-slim`` leave it unchanged, since it has no momentum to correct or look ahead by.
"""

from __future__ import annotations

import torch

from distbelief.optim import CHUNK, Ranges, adagrad_update, chunks, sgd_update

# The default, DownpourConfig.staleness_rule = "dana+lr", was chosen by measurement
# (docs/benchmarks.md, "Staleness rules" and "CIFAR-10 at 2,000 minibatches").
STALENESS_DECAY = 0.9  # the moving average of staleness forgets with this factor per push
DC_MEAN_SQUARE_DECAY = 0.95  # DC-ASGD-a's MeanSquare(g) (Zheng et al., 2017, Sec. 5: m = 0.95)
DC_EPSILON = 1e-7  # keeps lambda_t finite where a gradient element has always been 0

SOURCES = {  # one per engine.config.STALENESS_RULES
    "none": "no correction (Dean et al., 2012)",
    "lr": "lr / staleness (Zhang et al., 2016)",
    "momentum": "momentum less the ~1-1/N asynchrony adds (Mitliagkas et al., 2016)",
    "dc": "delay compensation g + lambda_t g*g*(w - w_fetched), lambda_t = lambda / "
          "sqrt(MeanSquare(g)) (Zheng et al., 2017)",
    "dana": "a momentum per replica, gradients at the look-ahead w - lr*momentum*sum(s*v) "
            "(Hakimi et al., 2019)",
    "dana-slim": "DANA-Slim: a momentum on each replica, which pushes d + momentum*v; plain "
                 "steps on the shard (Hakimi et al., 2019)",
}
LOOKAHEAD_RULES = ("dana", "dana-slim")


def staleness_lr(lr: float, staleness: int) -> float:
    """Zhang et al.: the step of a gradient `staleness` updates old."""
    return lr / max(1, staleness)


def implicit_momentum(mean_staleness: float) -> float:
    """Mitliagkas et al.: the momentum asynchrony adds, 1 - 1/N where N - 1 is the mean
    staleness."""
    return mean_staleness / (mean_staleness + 1.0)


def corrected_momentum(momentum: float, mean_staleness: float) -> float:
    """The explicit momentum that, with asynchrony's own, makes about `momentum` (never below 0)."""
    return max(0.0, momentum - implicit_momentum(mean_staleness))


def delay_compensated(g: torch.Tensor, w_now: torch.Tensor, w_fetched: torch.Tensor,
                      lam) -> torch.Tensor:
    """Zheng et al.: g + lam * g * g * (w_now - w_fetched), a new tensor (lam a number, or a
    tensor of lambda_t per element)."""
    return g + lam * g * g * (w_now - w_fetched)


def adaptive_lambda(mean_square: torch.Tensor, g: torch.Tensor, lam0: float) -> torch.Tensor:
    """DC-ASGD-a: updates `mean_square` in place with g * g (decay DC_MEAN_SQUARE_DECAY) and
    returns lambda_t = lam0 / sqrt(mean_square + DC_EPSILON) per element."""
    mean_square.mul_(DC_MEAN_SQUARE_DECAY).addcmul_(g, g, value=1 - DC_MEAN_SQUARE_DECAY)
    return lam0 / (mean_square + DC_EPSILON).sqrt()


def rules_of(config) -> set[str]:
    """The corrections --staleness-rule names ("momentum+lr": both)."""
    return set(config.downpour.staleness_rule.split("+")) - {"none"}


def describe(config) -> str:
    """The rule in force, in one line (the driver prints it)."""
    rules = rules_of(config)
    base = ("adagrad" if config.optimizer == "adagrad"
            else f"sgd momentum {config.momentum:g}")
    if config.downpour.local_steps:
        base = (f"{config.downpour.local_steps} local sgd steps per push, their change applied "
                f"at outer lr {config.downpour.outer_lr:g} with momentum {config.momentum:g}")
    if rules & {"momentum", *LOOKAHEAD_RULES} and config.optimizer == "adagrad":
        base += " (the momentum correction and dana do not apply to adagrad)"
    parts = [SOURCES[r] + (f", lambda {config.downpour.dc_lambda:g}" if r == "dc" else "")
             for r in sorted(rules)] or [SOURCES["none"]]
    line = f"{base}; staleness rule {config.downpour.staleness_rule}: {'; '.join(parts)}"
    if config.downpour.async_warmup:
        line += (f"; lr from lr/{config.cluster.replicas} up to lr over the first "
                 f"{config.downpour.async_warmup} minibatches (--async-warmup, Goyal 2017)")
    return line


@torch.no_grad()
def lookahead_update(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, total: torch.Tensor,
                     lr: float, momentum: float, weight_decay: float, nesterov: bool,
                     scale: float = 1.0, old_scale: float = 1.0) -> None:
    """`sgd_update` on w at lr * scale with one source's momentum v (zero before its first
    push), keeping total, the sum of all sources' scale * momentum, up to date:
    total += scale * v_new - old_scale * v_old. Fused in L2-sized chunks, four operations per
    chunk without weight decay: the update walks 100 MB vectors once per push, so per-chunk
    calls, not arithmetic, were a third of its time (a shard's push of 25M floats on 2
    threads, in process: 66 -> 42 ms). v = d + momentum * v is one operation (torch's SGD
    takes two; the rounding differs in the last bit, and dana has no bit-exact reference to
    keep)."""
    n = w.numel()
    scratch = torch.empty(min(CHUNK, n)) if weight_decay or nesterov else None
    for lo, hi in chunks(n):
        wc, vc, tc = w[lo:hi], v[lo:hi], total[lo:hi]
        d = torch.add(g[lo:hi], wc, alpha=weight_decay, out=scratch[:hi - lo]) \
            if weight_decay else g[lo:hi]
        tc.sub_(vc, alpha=old_scale)
        torch.add(d, vc, alpha=momentum, out=vc)
        tc.add_(vc, alpha=scale)
        if nesterov:
            d = torch.add(d, vc, alpha=momentum, out=scratch[:hi - lo])
        wc.add_(d if nesterov else vc, alpha=-lr * scale)


class Lookahead:
    """DANA-Zero's state (rule ``dana``): a momentum vector v_j per source, the lr factor s_j
    of its last step, and the sum of s_j * v_j.

    `step(w, g, source, lr, scale, ...)` is the SGD step at lr * scale with `source`'s own
    momentum (the first push of a source starts it at zero, so its first step is v = g as
    torch's); `ahead(w, lr, momentum)` is w - lr * momentum * sum_j s_j v_j, where the shard
    will be once every source has pushed once more, if those gradients were zero: the point a
    fetching replica computes its next gradient at. Each source's next step is assumed to take
    the factor its last one took (under ``lr``, 1 / staleness: steady in steady state). The sum
    is kept up to date at every step, so a fetch costs one pass. `retire(source)` takes a
    source's momentum out of the sum for good (a replica that is gone)."""

    def __init__(self, n: int, ranges: Ranges):
        self.n, self.ranges = n, ranges
        self.velocity: dict[int, torch.Tensor] = {}
        self.scale: dict[int, float] = {}
        self.total = torch.zeros(n)

    def step(self, w: torch.Tensor, g: torch.Tensor, source: int, lr: float, scale: float,
             momentum: float, weight_decay: float, nesterov: bool) -> None:
        v = self.velocity.get(source)
        if v is None:
            v = self.velocity[source] = torch.zeros(self.n)
        old = self.scale.get(source, 1.0)
        self.scale[source] = scale
        self.ranges.run(self.n, lambda lo, hi: lookahead_update(
            w[lo:hi], g[lo:hi], v[lo:hi], self.total[lo:hi], lr, momentum, weight_decay,
            nesterov, scale, old))

    def ahead(self, w: torch.Tensor, lr: float, momentum: float, out: torch.Tensor) -> None:
        """out = w - lr * momentum * sum_j s_j v_j, rounded to out's dtype."""
        total, alpha = self.total, -lr * momentum
        self.ranges.run(self.n, lambda lo, hi: torch.add(w[lo:hi], total[lo:hi], alpha=alpha,
                                                         out=out[lo:hi]))

    def retire(self, source: int) -> bool:
        """Take `source`'s momentum out of the look-ahead; whether it had any."""
        v = self.velocity.pop(source, None)
        if v is None:
            return False
        self.total.sub_(v, alpha=self.scale.pop(source, 1.0))
        return True

    def snapshot(self, copy) -> dict:
        """The momentum vectors, each through `copy(name, tensor)` (`StaleUpdate.snapshot`)."""
        return {"velocity": {str(k): copy(f"velocity/{k}", v) for k, v in self.velocity.items()},
                "velocity_scale": {str(k): s for k, s in self.scale.items()},
                "velocity_total": copy("velocity_total", self.total)}

    def load_state_dict(self, state: dict, tensor) -> None:
        """A state without momentum vectors (saved under another rule) starts them at zero."""
        self.velocity = {int(k): tensor(v) for k, v in state.get("velocity", {}).items()}
        self.scale = {int(k): float(s) for k, s in state.get("velocity_scale", {}).items()}
        if "velocity_total" in state:
            self.total = tensor(state["velocity_total"])


class SlimMomentum:
    """DANA-Slim's replica side (rule ``dana-slim``): the replica's own momentum v. `push(g, w)`
    returns what the replica sends for its accumulated gradient g computed at the fetched
    parameters w: d + momentum * v after v = momentum * v + d, d = g + weight_decay * w (a new
    tensor; g is left as it is). The shard's plain step of it at lr moves its values as
    DANA-Zero moves its look-ahead point."""

    def __init__(self, momentum: float, weight_decay: float):
        self.momentum, self.weight_decay = momentum, weight_decay
        self.v: torch.Tensor | None = None

    @torch.no_grad()
    def push(self, g: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        d = g.float()
        if self.weight_decay:
            d = d + self.weight_decay * w.to(d.device, torch.float32)
        if self.v is None:
            self.v = d.clone()
        else:
            self.v.mul_(self.momentum).add_(d)
        return d.add(self.v, alpha=self.momentum)


def slim_momentum(config) -> SlimMomentum | None:
    """The replica's DANA-Slim momentum under rule ``dana-slim`` (SGD with momentum), else
    None."""
    if "dana-slim" in rules_of(config) and config.optimizer == "sgd" and config.momentum:
        return SlimMomentum(config.momentum, config.weight_decay)
    return None


class StaleUpdate:
    """The update a shard applies to its parameter elements, with the staleness rule.

    `remember(source, version, w)` keeps the values a replica fetched (rule ``dc`` only);
    `apply(w, g, lr, staleness, source, base_version)` updates w in place. `snapshot(copy)` holds
    the optimizer state and the staleness average; fetched values are not kept across a restart
    (a push whose fetch is unknown is applied uncompensated and counted in `uncompensated`).
    """

    def __init__(self, config, n: int, threads: int = 1):
        self.config = config
        self.rules = rules_of(config)
        # --local-steps: a push is a change the replica's own steps made, weight decay taken
        # (`downpour.local`); the shard's step adds only the momentum.
        self.weight_decay = 0.0 if config.downpour.local_steps else config.weight_decay
        self.opt_state: torch.Tensor | None = (
            torch.zeros(n) if config.optimizer == "adagrad" else None)
        self.mean_staleness = float(config.cluster.replicas - 1)
        self.fetched: dict[int, dict[int, torch.Tensor]] = {}  # source -> version -> values
        self.uncompensated = 0
        self.ranges = Ranges(threads)  # the update's elements, cut among the shard's threads
        # dana: SGD with momentum only (without, its look-ahead is w itself).
        sgd_momentum = config.optimizer == "sgd" and bool(config.momentum)
        self.lookahead = (Lookahead(n, self.ranges) if "dana" in self.rules and sgd_momentum
                          else None)
        # dana-slim: the replicas push d + momentum * v; the shard steps plainly.
        self.slim = "dana-slim" in self.rules and sgd_momentum
        self.mean_square = torch.zeros(n) if "dc" in self.rules else None  # DC-ASGD-a

    def remember(self, source: int | None, version: int, w: torch.Tensor) -> None:
        if "dc" not in self.rules or source is None:
            return
        held = self.fetched.setdefault(source, {})
        if version not in held:
            held[version] = w.clone()

    def looks_ahead(self, source: int | None) -> bool:
        """Whether a fetch by `source` gets look-ahead parameters (rule ``dana``, a replica)."""
        return source is not None and self.lookahead is not None

    def ahead(self, w: torch.Tensor, lr: float, out: torch.Tensor) -> None:
        """out = the parameters a replica fetching now computes at (`Lookahead.ahead`)."""
        self.lookahead.ahead(w, lr, self.config.momentum, out)

    def retire(self, source: int) -> bool:
        """A replica that is gone for good: its momentum leaves the look-ahead, its fetched
        values are dropped. Whether it held any momentum here."""
        self.fetched.pop(source, None)
        return self.lookahead is not None and self.lookahead.retire(source)

    def momentum(self) -> float:
        """The explicit momentum the next update uses (on the shard: 0 under dana-slim, whose
        momentum is on the replicas)."""
        m = self.config.momentum
        if self.slim:
            return 0.0
        return corrected_momentum(m, self.mean_staleness) if "momentum" in self.rules else m

    def apply(self, w: torch.Tensor, g: torch.Tensor, lr: float, staleness: int,
              source: int | None = None, base_version: int | None = None) -> None:
        self.mean_staleness = (STALENESS_DECAY * self.mean_staleness
                               + (1 - STALENESS_DECAY) * staleness)
        scale = staleness_lr(1.0, staleness) if "lr" in self.rules else 1.0
        if "dc" in self.rules:
            g = self._compensate(w, g, source, base_version)
        if self.lookahead is not None:
            c = self.config
            self.lookahead.step(w, g, -1 if source is None else source, lr, scale, c.momentum,
                                self.weight_decay, c.nesterov)
            return
        self._step(w, g, lr * scale)

    def _step(self, w: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        """The optimizer's step, fused (`optim`) and cut among the shard's threads."""
        c, state = self.config, self.opt_state
        if c.optimizer == "adagrad":
            self.ranges.run(w.numel(), lambda lo, hi: adagrad_update(
                w[lo:hi], g[lo:hi], state[lo:hi], lr, c.weight_decay))
            return
        if self.slim:  # the replica's push holds its momentum and weight decay already
            self.ranges.run(w.numel(), lambda lo, hi: w[lo:hi].add_(g[lo:hi], alpha=-lr))
            return
        momentum = self.momentum()
        fresh = bool(momentum) and state is None
        if fresh:  # the first step with momentum: each range fills its part of the buffer
            state = self.opt_state = torch.empty_like(w)
        self.ranges.run(w.numel(), lambda lo, hi: sgd_update(
            w[lo:hi], g[lo:hi], None if state is None else state[lo:hi], lr, momentum,
            self.weight_decay, c.nesterov, fresh=fresh))

    def _compensate(self, w, g, source, base_version) -> torch.Tensor:
        held = self.fetched.get(source, {})
        w_fetched = held.get(base_version)
        # Later pushes of this source come from this fetch or newer ones: drop the older.
        for version in [v for v in held if base_version is not None and v < base_version]:
            del held[version]
        # In float32: a low-precision gradient's square would lose what the term corrects.
        g = g.float()
        lam = adaptive_lambda(self.mean_square, g, self.config.downpour.dc_lambda)
        if w_fetched is None:
            self.uncompensated += 1
            return g
        return delay_compensated(g, w, w_fetched, lam)

    def snapshot(self, copy) -> dict:
        """The optimizer state (through `copy(name, tensor)`, which `ParameterShard.snapshot`
        gives: arrays reused between snapshots) and the staleness average."""
        return {"opt_state": copy("opt_state", self.opt_state),
                "mean_staleness": self.mean_staleness,
                "dc_mean_square": copy("dc_mean_square", self.mean_square),
                **(self.lookahead.snapshot(copy) if self.lookahead is not None else {})}

    def load_state_dict(self, state: dict, tensor) -> None:
        """`tensor` turns a stored array into a float32 tensor of our own."""
        self.opt_state = None if state["opt_state"] is None else tensor(state["opt_state"])
        self.mean_staleness = float(state.get("mean_staleness", self.mean_staleness))
        if self.mean_square is not None and state.get("dc_mean_square") is not None:
            self.mean_square = tensor(state["dc_mean_square"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state, tensor)
