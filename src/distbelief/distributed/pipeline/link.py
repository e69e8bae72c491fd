"""Hand-offs as point-to-point messages of a collective group (`--pipeline-handoff
collective`). No Ray here: torch.distributed, in the process group that Ray's collective API
(`ray.util.collective`, backend gloo) sets up among a replica's stage actors, one rank per
stage.

A `Link` stands where a stage's `relay.Mailbox` stands for `relay.relay_step`: `take(key)`
receives what a neighbour hands this stage, `send(where, key, tensor)` hands a tensor on. A
message goes from one stage's process to its neighbour's over the group's own connection
(TCP on the CPU), without Ray's object store, its raylet, or a Ray call per hand-off: on two
cores a 1 MiB hand-off between actors costs ~0.8 ms this way, against ~3.5 ms as a Ray call,
and a sixth of the sender's CPU time (docs/benchmarks.md).

Each hand-off is two messages with the same tag pair: a header (dtype and shape, so the
receiver can allocate) and the tensor's bytes. Messages between two ranks under one tag
arrive in the order they were sent, and every step sends each tag once per neighbour, so tags
need not carry the step. Sends do not block the stage (`isend`); a step waits for its own
sends at the start of the next (`begin`), by when the neighbours have received them.

A neighbour that dies closes the connection, and a `take` waiting on it raises at once; a
stage whose step fails otherwise closes its end (`close`), so that its neighbours' waits raise
too rather than wait for ever. A group whose step failed is not used again: the driver forms a
new one (`PipelineRunner`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distbelief.distributed.pipeline.relay import NEXT, PREVIOUS

HEADER = 8  # int64s: the dtype's code, the number of dimensions, up to 6 sizes
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)
# bfloat16 and float16 travel as their 16 bits: gloo's point-to-point ops move bytes either way
WIRE = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def tag(kind: str, micro: int) -> int:
    """The header's tag of micro-batch `micro`'s activation ("F") or gradient ("B"); its
    payload's is the next one."""
    return 4 * micro + (2 if kind == "B" else 0)


def header(value: torch.Tensor) -> torch.Tensor:
    """The int64 header that lets a receiver allocate `value`."""
    if value.dim() > HEADER - 2 or value.dtype not in DTYPES:
        raise ValueError(f"cannot hand on a {value.dtype} tensor of {value.dim()} dimensions")
    return torch.tensor([DTYPES.index(value.dtype), value.dim(), *value.shape,
                         *[0] * (HEADER - 2 - value.dim())], dtype=torch.int64)


def allocate(head: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the dtype and shape `head` describes."""
    code, ndim, *sizes = head.tolist()
    return torch.empty(sizes[:ndim], dtype=DTYPES[code])


def on_wire(value: torch.Tensor) -> torch.Tensor:
    """`value`'s bytes as gloo moves them (in CPU memory, contiguous; 16-bit floats as
    int16)."""
    value = value.detach().cpu().contiguous()
    return value.view(WIRE[value.dtype]) if value.dtype in WIRE else value


class Link:
    """Stage `rank`'s hand-offs in the default process group (module doc): activations come
    from rank - 1, gradients from rank + 1."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pending: list[tuple] = []  # (work, tensor): sends in flight, their tensors kept

    def begin(self, step: int) -> None:
        """Wait for the previous step's sends (its neighbours received them in that step)."""
        for work, _ in self.pending:
            work.wait()
        self.pending = []

    def send(self, where: int, key: tuple, value: torch.Tensor) -> None:
        """Hand `value` (micro-batch key[2]'s activation or gradient) to the stage `where`
        (NEXT or PREVIOUS) without waiting."""
        _, kind, micro = key
        dst, first = self.rank + where, tag(kind, micro)
        head, payload = header(value), on_wire(value)
        self.pending += [(dist.isend(head, dst, tag=first), head),
                         (dist.isend(payload, dst, tag=first + 1), payload)]

    def take(self, key: tuple) -> torch.Tensor:
        """What the neighbour handed on under `key` ((step, "F" or "B", micro-batch)), once
        it is here.

        Raises:
            RuntimeError: the neighbour died or closed its end (module doc)."""
        _, kind, micro = key
        src, first = self.rank + (PREVIOUS if kind == "F" else NEXT), tag(kind, micro)
        head = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(head, src, tag=first)
        value = allocate(head)
        dist.recv(on_wire(value), src, tag=first + 1)  # the same storage, seen as it travels
        return value
