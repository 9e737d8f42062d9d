"""Waiting on the event a test means, never on the clock.

A test that sleeps "long enough" or asserts "within 1 s" fails on a machine faster or slower than the one it was
written on. So a test waits until what it means has happened (a count, a state, a message), checked again and
again; the time limit is only a guard against what never happens, set far beyond what any machine takes, so a
slow machine is only slower, never failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

GUARD_S: Final = 30.0
"""How long to wait for an in-process event (milliseconds, on any machine) before calling it lost."""

ENGINE_GUARD_S: Final = 600.0
"""The same for what starts an engine or a Jupyter server: the product's own ``start_timeout``."""

_POLL_S: Final = 0.01


def eventually(check: Callable[[], object], what: str = "", within: float = GUARD_S) -> None:
    """Return once ``check()`` is true; fail, naming ``what``, if it never is."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(_never(check, what, within))
        time.sleep(_POLL_S)


async def eventually_async(check: Callable[[], object], what: str = "", within: float = GUARD_S) -> None:
    """``eventually`` for a test on an event loop, which goes on serving while this waits."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(_never(check, what, within))
        await asyncio.sleep(_POLL_S)


def _never(check: Callable[[], object], what: str, within: float) -> str:
    return f"never happened (waited {within:g} s): {what or check.__qualname__}"
