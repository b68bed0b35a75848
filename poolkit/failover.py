"""One connect callable built from several: one per node of a cluster."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from poolkit.drivers import driver_for_connection

__all__ = ["Failover", "failover"]

logger = logging.getLogger("poolkit.failover")


class Failover:
    """A connect callable that tries its targets in turn, starting with the
    one that last succeeded, and raises the last error when none answers.

    A pool calls :meth:`not_leader` when a connection's node refused a write
    as not the leader (a demoted primary that still answers, a standby, a
    dqlite follower): the next connect starts with the node after it instead
    of reconnecting to the one that refused. Any connect callable may have a
    ``not_leader(conn)`` method; the pool calls it the same way.
    """

    def __init__(self, connects: tuple[Callable[[], Any], ...]) -> None:
        if not connects:
            raise ValueError("failover() needs at least one connect callable")
        for i, c in enumerate(connects):
            if not callable(c):
                raise TypeError(f"connect #{i} is not callable: {c!r}")
        self.connects = connects
        self._lock = threading.Lock()  # protects _preferred and _origin
        self._preferred = 0
        # which target each connection came from (drivers whose connections
        # take no weak reference are not tracked: see not_leader)
        self._origin: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @property
    def preferred(self) -> int:
        """The index of the target the next connect tries first."""
        return self._preferred

    def __call__(self) -> Any:
        with self._lock:
            start = self._preferred
        last: BaseException | None = None
        n = len(self.connects)
        for k in range(n):
            i = (start + k) % n
            conn = None
            try:
                conn = self.connects[i]()
                # a driver that connects lazily has not met the server yet
                driver_for_connection(conn).open(conn)
            except Exception as exc:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                logger.info("failover: target %d of %d refused: %r", i + 1, n, exc)
                last = exc
                continue
            except BaseException:  # interrupted (KeyboardInterrupt) in the open: close it, then go on
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                raise
            with self._lock:
                self._preferred = i
                try:
                    self._origin[conn] = i
                except TypeError:
                    pass
            return conn
        assert last is not None
        raise last

    def not_leader(self, conn: Any) -> None:
        """``conn``'s node is not the leader: start the next connect after it."""
        with self._lock:
            try:
                i = self._origin.get(conn, self._preferred)
            except TypeError:
                i = self._preferred
            if i == self._preferred and len(self.connects) > 1:
                self._preferred = (i + 1) % len(self.connects)
                logger.info(
                    "failover: target %d of %d is not the leader; trying target %d first",
                    i + 1,
                    len(self.connects),
                    self._preferred + 1,
                )

    def __repr__(self) -> str:
        return f"<poolkit.failover over {len(self.connects)} targets, preferring #{self._preferred + 1}>"


def failover(*connects: Callable[[], Any]) -> Failover:
    """A connect callable that tries ``connects`` in turn (see :class:`Failover`).

    Use it to give a pool every seed node of a dqlite cluster, or every host
    of a replicated PostgreSQL or MariaDB: a pool pointed at one address
    dies with that node, and one that reconnects to the last node that
    answered stays on a demoted primary.
    """
    return Failover(connects)
