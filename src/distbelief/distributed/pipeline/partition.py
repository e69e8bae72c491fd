"""The partitioner: a model cut into P contiguous parts along its natural boundaries, balanced
by a cost that counts multiply-adds and the activations kept for backward (Dean et al., 2012,
Sec. 3: "the model is partitioned ... each machine is responsible for a part of the model").
No Ray here.

Units are the pieces a model may be cut between:

- a ResNet (anything with `stages()`): the stem, every residual block, the head;
- an `nn.Sequential`: each of its children;
- anything else is one unit, so it cannot be cut (a clear error asks for one of the above).

Each part is an `nn.Sequential` of its units, sharing their modules with the model (nothing is
copied), so running the parts in order computes the model's `forward`, and a part's
`parameters()` are a contiguous run of the model's `parameters()` (the units are the model's
modules in registration order): part p holds the model's parameters offset_p .. offset_p+n_p-1,
which is how optimizer states move between the whole model and its parts.

Balance. Unless `--partition-at` names the units where parts begin, the cut minimizes the
largest part's cost: the classic linear partition, solved
exactly by dynamic programming. The largest part is then at most the mean part plus the
costliest unit (`Plan.bound`), the tolerance the tests hold it to. A unit's cost is its
forward multiply-adds plus ACTIVATION_COST per element it keeps for backward, per example,
plus one (so units without either still count). Multiply-adds alone leave a ResNet's parts
lopsided: a block of 16 channels at 32x32 has the multiply-adds of one of 32 at 16x16 but
twice its activations, and its step takes 1.65x as long, the time going to memory traffic
(BatchNorm, ReLU, the additions). The activations are what a partition holds in memory too,
so the same cost balances the parts' memory. Backward costs about twice the forward for
every layer with weights, so balancing the forward balances the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distbelief.errors import ConfigError
from distbelief.models.init import units

# Multiply-adds that one element kept for backward costs in a step: a least-squares fit of
# ResNet-20's and ResNet-56's units' step times (forward and backward, micro-batches of 16,
# one CPU thread) to their multiply-adds and kept elements gave 126 and 157
# (docs/benchmarks.md, "Balancing the parts").
ACTIVATION_COST = 128
# Bytes of training state per parameter: float32 weight, gradient and one optimizer slot
# (SGD's momentum; Adagrad's sum of squares).
STATE_BYTES_PER_PARAM = 12


@dataclass
class Part:
    """Part `index` of a cut model: its units' names, the module computing them, its size."""

    index: int
    names: list[str]
    module: nn.Sequential
    params: int  # parameter elements
    macs: int  # forward multiply-adds per example
    offset: int  # index of its first tensor in the model's parameters()
    kept: int = 0  # elements kept for backward per example (activations, float32)

    @property
    def state_bytes(self) -> int:
        """Its training state: weights, gradients and one optimizer slot, float32."""
        return self.params * STATE_BYTES_PER_PARAM

    @property
    def activation_bytes(self) -> int:
        """Bytes of activations it keeps for backward per example, float32."""
        return self.kept * 4

    @property
    def n_tensors(self) -> int:
        return sum(1 for _ in self.module.parameters())

    def describe(self) -> str:
        first, last = self.names[0], self.names[-1]
        return first if first == last else f"{first} .. {last}"


def check_disjoint(model: nn.Module, modules: list[nn.Module]) -> None:
    """Raise `ConfigError` unless the parts' parameters, in order, are exactly the model's,
    each in one part: a parameter shared by two parts (a layer used twice, tied weights) would
    be trained twice, and optimizer states would land on the wrong parameters."""
    owner: dict[int, int] = {}
    for p, module in enumerate(modules):
        for t in module.parameters():
            if owner.setdefault(id(t), p) != p:
                raise ConfigError("cannot cut this model: a parameter is shared by two "
                                  "partitions (a layer used twice, tied weights)")
    if [id(t) for m in modules for t in m.parameters()] != [id(t) for t in model.parameters()]:
        raise ConfigError("cannot cut this model: its parameters are not in the order its "
                          "layers run (give an nn.Sequential or a ResNet)")


def unit_profile(pieces: list[tuple[str, nn.Module]], sample: torch.Tensor
                 ) -> list[tuple[int, int]]:
    """(forward multiply-adds, elements kept for backward) per example of each unit on
    `sample` (one example, batch dimension 1), counted as it flows through the units in order;
    in eval mode, so BatchNorm statistics are left untouched (what train mode keeps on top is
    a per-channel vector or two)."""
    out, x = [], sample.detach().requires_grad_(sample.is_floating_point())
    modes = [m.training for _, m in pieces]
    try:
        for _, module in pieces:
            module.eval()
            kept = [0]

            def pack(t: torch.Tensor, kept=kept) -> torch.Tensor:
                if not isinstance(t if t._base is None else t._base, nn.Parameter):
                    kept[0] += t.numel()  # an activation: not a weight, nor a view of one
                return t

            with FlopCounterMode(display=False) as counter, torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = module(x)
            out.append((counter.get_total_flops() // 2, kept[0]))
            x = y.detach().requires_grad_(y.is_floating_point())
    finally:
        for (_, module), mode in zip(pieces, modes):
            module.train(mode)
    return out


def linear_partition(costs: list[int], parts: int) -> list[int]:
    """Where to cut `costs` into `parts` non-empty contiguous runs minimizing the largest sum:
    the start index of every run but the first. Exact (dynamic programming, O(parts n^2))."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest sum cutting the first i units into k runs.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 1, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


@dataclass
class Plan:
    parts: list[Part]
    unit_costs: list[int]
    bounds: list[int]  # the parts' first units, and the number of units

    def modules_of(self, model: nn.Module) -> list[nn.Sequential]:
        """The same cut of another instance of the model (a meta copy, the driver's copy)."""
        pieces = units(model)
        if len(pieces) != self.bounds[-1]:
            raise ValueError(f"a model of {len(pieces)} units, cut for {self.bounds[-1]}")
        return [nn.Sequential(*(m for _, m in pieces[lo:hi]))
                for lo, hi in zip(self.bounds, self.bounds[1:])]

    @property
    def bound(self) -> float:
        """The balance guarantee: no part costs more than this (mean part + costliest unit)."""
        costs = [c + 1 for c in self.unit_costs]
        return sum(costs) / len(self.parts) + max(costs)


def cut_at(names: list[str], at: str, parts: int) -> list[int]:
    """The indices of the units named in `at` (comma-separated: where parts 2 .. `parts`
    begin, `--partition-at`) among the model's units `names`.

    Raises:
        ConfigError: not `parts` - 1 names, a name that is no unit, or names out of order."""
    wanted = [a.strip() for a in at.split(",") if a.strip()]
    if len(wanted) != parts - 1:
        raise ConfigError(f"--partition-at names {len(wanted)} unit(s): {parts} partitions "
                          f"begin at {parts - 1}")
    unknown = [a for a in wanted if a not in names]
    if unknown:
        raise ConfigError(f"--partition-at: no unit {unknown[0]!r} in the model (its units: "
                          f"{', '.join(names)})")
    starts = [names.index(a) for a in wanted]
    if starts[0] == 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"--partition-at: {', '.join(wanted)} are not in the model's order "
                          f"after its first unit ({names[0]})")
    return starts


def partition(model: nn.Module, parts: int, sample: torch.Tensor, at: str = "") -> Plan:
    """`model` cut into `parts` contiguous parts balanced by cost (module doc), measured on `sample`
    (one example with its batch dimension, on the model's device); or, where `at` names the
    units parts 2 .. P begin at (`cut_at`), cut there.

    Raises:
        ConfigError: fewer units than parts (the message says how many there are), or an `at`
            that does not name a cut."""
    pieces = units(model)
    if parts < 1:
        raise ConfigError(f"--partitions must be positive, got {parts}")
    if parts > len(pieces):
        what = ("it is one unit: give an nn.Sequential or a ResNet" if len(pieces) == 1
                else f"it has {len(pieces)} units ({', '.join(n for n, _ in pieces[:8])}"
                     f"{' ...' if len(pieces) > 8 else ''})")
        raise ConfigError(f"cannot cut the model into {parts} partitions: {what}")
    profile = unit_profile(pieces, sample)
    costs = [macs + ACTIVATION_COST * kept for macs, kept in profile]
    starts = (cut_at([n for n, _ in pieces], at, parts) if at
              else linear_partition([c + 1 for c in costs], parts))
    bounds = [0, *starts, len(pieces)]
    out, offset = [], 0
    modules = [nn.Sequential(*(m for _, m in pieces[lo:hi])) for lo, hi in zip(bounds, bounds[1:])]
    check_disjoint(model, modules)
    for p, ((lo, hi), module) in enumerate(zip(zip(bounds, bounds[1:]), modules)):
        part = Part(p, [n for n, _ in pieces[lo:hi]], module,
                    sum(t.numel() for t in module.parameters()),
                    sum(m for m, _ in profile[lo:hi]), offset,
                    sum(k for _, k in profile[lo:hi]))
        offset += part.n_tensors
        out.append(part)
    return Plan(out, costs, bounds)


def split_table(name: str, parts: int, input_size: int | None = None, at: str = "",
                **kwargs) -> list[dict]:
    """`distbelief models NAME --partitions P [--partition-at UNITS]`: one row per part of
    the registered model `name` (its units, parameters, multiply-adds, training state and
    activation bytes per example), measured on the meta device (no memory, no compute)."""
    from distbelief.models import create_model, model_info

    info = model_info(name)
    size = info.input_size if input_size is None else input_size
    if info.sized:
        kwargs = {**kwargs, "input_size": size}
    with torch.device("meta"):
        model = create_model(name, **kwargs)
        sample = torch.zeros(1, kwargs.get("in_chans", 3), size, size)
    plan = partition(model, parts, sample, at)
    return [{"model": name, "partition": p.index, "units": p.describe(), "params": p.params,
             "macs": p.macs, "state_bytes": p.state_bytes,
             "activation_bytes_per_example": p.activation_bytes} for p in plan.parts]
