"""Errors of the engine. In a module of their own because the compiled modules cannot
subclass ``AssertionError`` (mypyc's native classes inherit from a few builtin types only)."""

from __future__ import annotations

__all__ = ["InvariantError", "LeftOutError"]


class InvariantError(AssertionError):
    """A broken internal invariant: a bug, never a client's fault."""


class LeftOutError(ValueError):
    """The configuration leaves out an instrument or member that the state or journal has a
    history for: running on would make its orders, trades and balances vanish."""
