"""One connect callable built from several: one per node of a cluster."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from poolkit.drivers import driver_for_connection

__all__ = ["failover"]

logger = logging.getLogger("poolkit.failover")


def failover(*connects: Callable[[], Any]) -> Callable[[], Any]:
    """A connect callable that tries ``connects`` in turn, starting with the
    one that last succeeded, and raises the last error when none answers.

    Use it to give a pool every seed node of a dqlite cluster, or every host
    of a replicated PostgreSQL or MariaDB: a pool pointed at one address
    dies with that node.
    """
    if not connects:
        raise ValueError("failover() needs at least one connect callable")
    for i, c in enumerate(connects):
        if not callable(c):
            raise TypeError(f"connect #{i} is not callable: {c!r}")
    lock = threading.Lock()  # protects preferred
    preferred = 0

    def connect() -> Any:
        nonlocal preferred
        with lock:
            start = preferred
        last: BaseException | None = None
        for k in range(len(connects)):
            i = (start + k) % len(connects)
            conn = None
            try:
                conn = connects[i]()
                # a driver that connects lazily has not met the server yet
                driver_for_connection(conn).open(conn)
            except Exception as exc:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                logger.info("failover: target %d of %d refused: %r", i + 1, len(connects), exc)
                last = exc
                continue
            with lock:
                preferred = i
            return conn
        assert last is not None
        raise last

    return connect
