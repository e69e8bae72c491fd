"""Initialization by name, so that a part of a model built alone starts as the same part of the
whole model.

A registry model draws one seed from torch's global generator when it is built (so
`torch.manual_seed(s)` before building still fixes every value) and keeps it as `init_seed`, with
its rule as `init_rule`. Each module holding tensors of its own then draws its values from a
generator seeded by (that seed, the module's name), the name being its unit's (`units`: the
pieces a partition is cut from) and its own within the unit. A module's values therefore depend
on nothing else that was built: a model-parallel partition (or a parameter-server shard) builds
its part on the meta device, materializes it where it runs, and calls `initialize` on it alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

Rule = Callable[[nn.Module, str, nn.Module], None]  # (unit, name in the unit, module)


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's cuttable pieces in order, named as in the model: a ResNet's stem, each of
    its blocks and its head (`model.stages()`), an nn.Sequential's children, or else the model
    as one piece. A module that appears twice (an activation reused) is a piece each time."""
    if callable(getattr(type(model), "stages", None)):
        out = []
        for name, stage in model.stages():
            if name in ("stem", "head"):
                out.append((name, stage))
            else:  # a stage of residual blocks: each block is a unit
                out.extend((f"{name}.{i}", block) for i, block in enumerate(stage))
        return out
    if isinstance(model, nn.Sequential):
        # Not named_children(), which skips a module seen before.
        return [(name, m) for name, m in model._modules.items() if m is not None]
    return [(type(model).__name__, model)]


def draw_seed() -> int:
    """One draw from torch's global CPU generator (also under a meta device context)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def module_seed(seed: int, name: str) -> int:
    """The seed of the module named `name` in a model seeded with `seed`: a hash, the same in
    every process and Python version."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def default_rule(unit: nn.Module, name: str, module: nn.Module) -> None:
    """torch's own initialization of the module (`reset_parameters`), where it has one."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or \
        any(True for _ in module.buffers(recurse=False))


@torch.no_grad()
def initialize(named_units: Iterable[tuple[str, nn.Module]], seed: int,
               rule: Rule = default_rule) -> None:
    """Give every module of `named_units` ((unit name, unit) pairs, as `units` names them)
    holding tensors of its own its values by `rule`, drawn from a generator seeded by
    `module_seed(seed, "<unit>.<name>")`. The global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        for unit_name, unit in named_units:
            for name, module in unit.named_modules():
                if _holds_tensors(module):
                    # The CPU generator alone: torch.manual_seed also queues every
                    # accelerator's, at a stack trace each (seconds for ResNet-1202).
                    torch.default_generator.manual_seed(module_seed(seed, f"{unit_name}.{name}"))
                    rule(unit, name, module)


def seeded(construct: Callable[[], nn.Module], rule: Rule = default_rule) -> nn.Module:
    """The model `construct()` builds, seeded (`set_seed`) with one number drawn from the
    global generator first. It is built on the meta device (its constructors draw nothing and
    allocate nothing), then given values where the caller builds (torch's default device)."""
    seed, where = draw_seed(), default_device()
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = construct()
    return set_seed(model, seed, rule, where)


def default_device() -> torch.device:
    """Where a tensor built without a device lands (a `torch.device` context sets it)."""
    return torch.empty(0).device


def set_seed(model: nn.Module, seed: int, rule: Rule = default_rule,
             device: torch.device | str = "cpu") -> nn.Module:
    """`model` with `seed` and `rule` kept with it (`init_seed`, `init_rule`) and fresh values
    set by name (`initialize`, drawn on the CPU), on `device` (on the meta device: none). Every
    tensor must belong to one of its `units`."""
    model.init_seed, model.init_rule = seed, rule
    pieces = units(model)
    covered = {id(t) for _, unit in pieces for t in [*unit.parameters(), *unit.buffers()]}
    if any(id(t) not in covered for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"{type(model).__name__} holds tensors outside its units()")
    if torch.device(device).type != "meta":
        initialize(units(model.to_empty(device="cpu")), seed, rule)
        model.to(device)
    return model


def materialize(module: nn.Module, names: list[str], seed: int, rule: Rule,
                device: torch.device | str = "cpu") -> nn.Module:
    """A part built on the meta device (an nn.Sequential of the units named `names`), with the
    values the whole model seeded with `seed` gives those units, on `device`. The values are
    drawn on the CPU, so that they are the same whatever the device."""
    module = module.to_empty(device="cpu")
    initialize(zip(names, module), seed, rule)
    return module.to(device)
