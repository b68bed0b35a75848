"""Helpers shared by the tests of interruptions and of hung connects."""

from __future__ import annotations

import time

from poolkit import Pool


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or gevent's Timeout: a BaseException,
    not an Exception, so no ``except Exception`` catches it."""


def consistent(pool: Pool, held: int = 0) -> None:
    """Every slot accounted for: ``held`` connections out, the rest idle,
    nothing stuck half-open and nobody left in line."""
    st = pool.stats()
    assert (st.in_use, st.opening, st.waiting) == (held, 0, 0), st
    assert st.open == held + st.idle, st


def settled(pool: Pool, timeout: float = 5.0) -> None:
    """Wait until no connect is running any more."""
    deadline = time.monotonic() + timeout
    while pool.stats().opening:
        assert time.monotonic() < deadline, f"a connect never ended: {pool.stats()}"
        time.sleep(0.002)
