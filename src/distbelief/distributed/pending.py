"""The pending-call protocol between a replica and its server client. No Ray here.

A client's calls (fetch, push, pull) return a *pending* result with two methods:

    done() -> bool     whether the result is there (never blocks)
    result()           the result, waiting for it if needed; may be read more than once

`runtime.calls.RayPending` implements it over Ray object references; `Done` is a result that is
already there (in-process shards, tests); `ItemOf` is one element of another pending result (a
push that also pulled).
"""

from __future__ import annotations


class Done:
    """A pending result that is already there."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class ItemOf:
    """Element `i` of another pending call's result."""

    def __init__(self, pending, i: int):
        self.pending, self.i = pending, i

    def done(self) -> bool:
        return self.pending.done()

    def result(self):
        return self.pending.result()[self.i]
