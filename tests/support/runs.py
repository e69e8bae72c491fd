"""Helpers for tests of the run lifecycle."""

import types


def at(config, position):
    """Where a scheme stands, as `RunLifecycle.begin` reads it."""
    return types.SimpleNamespace(config=config, device="cpu", position=position)
