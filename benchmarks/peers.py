"""The pools compared, behind one small interface.

Each peer is configured as its documentation recommends, and where it has a
health-checking configuration, that one is a peer of its own:

- ``raw``: one connection reused by one thread, no pool at all (the floor);
- ``bare``: a lock and a list, doing only what poolkit's checkout must do
  (the liveness probe and the transaction-state read): the practical floor;
- ``poolkit``: ``poolkit.Pool`` with its default settings (probe on);
- ``queuepool`` / ``queuepool_preping``: SQLAlchemy's ``QueuePool``;
- ``psycopg_pool`` / ``psycopg_pool_check``: psycopg_pool's
  ``ConnectionPool`` (PostgreSQL only), ``getconn``/``putconn``, without and
  with ``check=ConnectionPool.check_connection``;
- ``dbutils``: DBUtils ``PooledDB`` (its default ``ping=1``).

The runner calls each pool's own checkout and checkin, bound once
(``pool.acquire`` and ``conn.close`` for poolkit, ``pool.getconn`` and
``pool.putconn`` for psycopg_pool, ...): no peer pays for a frame of the
runner's between the timer and the pool. (``bare`` is a pool of its own, so
its methods are that pool's calls.) A checkin that is ``handle.close()`` is
the plain function ``close`` of the handle's class, called with the handle:
a Python call that 3.11 runs inline. (``operator.methodcaller("close")``
would add no frame but costs more: it calls back into Python from C.)

Queries go through what each pool hands out, as its users run them:
poolkit's proxy, SQLAlchemy's connection fairy, DBUtils' "tough" connection
wrapper (which reconnects and runs a failed statement again), psycopg_pool's
connection itself. ``driver_conn`` is the driver's connection behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from poolkit.drivers import IN_TRANSACTION, UNKNOWN, driver_for_connection, liveness_probe

ALL = ("raw", "bare", "poolkit", "queuepool", "queuepool_preping", "psycopg_pool", "psycopg_pool_check", "dbutils")


class Counting:
    """A connect callable that counts (and remembers) what it opened."""

    def __init__(self, connect: Callable[[], Any], delay: float = 0.0) -> None:
        self._connect = connect
        self.delay = delay
        self.lock = threading.Lock()
        self.opened: list[Any] = []

    def __call__(self) -> Any:
        if self.delay:
            threading.Event().wait(self.delay)
        conn = self._connect()
        with self.lock:
            self.opened.append(conn)
        return conn

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.opened)


class Peer:
    name = "?"
    #: whether the scenario can hand connections across threads
    multithreaded = True
    #: the pool's own calls, bound in ``__init__`` (or methods, for a pool
    #: written here): check out a handle, check it back in
    checkout: Callable[[], Any]
    checkin: Callable[[Any], Any]

    def __init__(self, connect: Counting, size: int) -> None:
        self.connect = connect
        self.size = size

    def conn(self, handle: Any) -> Any:
        """What the application queries through, for a checkout handle."""
        return handle

    def driver_conn(self, handle: Any) -> Any:
        """The driver's own connection behind a checkout handle."""
        return self.conn(handle)

    def warm(self) -> None:
        handles = [self.checkout() for _ in range(self.size)]
        for h in handles:
            self.checkin(h)

    def close(self) -> None:
        pass


class Raw(Peer):
    name = "raw"
    multithreaded = False

    def __init__(self, connect: Counting, size: int) -> None:
        super().__init__(connect, size)
        self.c = connect()

    def checkout(self) -> Any:
        return self.c

    def checkin(self, handle: Any) -> None:
        pass

    def warm(self) -> None:
        pass

    def close(self) -> None:
        self.c.close()


class Bare(Peer):
    """The floor for a pool that does poolkit's checks: lock, list, probe, state.

    It does them as cheaply as poolkit knows how (the same probe, the lock
    taken by hand, a notify only when somebody waits), so that it stays the
    floor: what is left between it and poolkit is poolkit's own bookkeeping.
    """

    name = "bare"

    def __init__(self, connect: Counting, size: int) -> None:
        super().__init__(connect, size)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiting = 0
        self.idle: list[tuple[Any, Any]] = []
        for _ in range(size):
            c = connect()
            driver = driver_for_connection(c)
            self.idle.append((c, liveness_probe(driver, c)))  # poolkit's own probe
        self.driver = driver

    def checkout(self) -> Any:
        lock = self.lock
        lock.acquire()
        try:
            while not self.idle:
                self.waiting += 1
                try:
                    self.cond.wait()
                finally:
                    self.waiting -= 1
            item = self.idle.pop()
        finally:
            lock.release()
        if item[1] is not None and item[1].poll(0, 1):
            raise RuntimeError("bare pool: dead connection (it has no recovery)")
        return item

    def checkin(self, handle: Any) -> None:
        state = self.driver.transaction_state(handle[0])
        if state in (IN_TRANSACTION, UNKNOWN):
            handle[0].rollback()
        lock = self.lock
        lock.acquire()
        try:
            self.idle.append(handle)
            if self.waiting:
                self.cond.notify()
        finally:
            lock.release()

    def conn(self, handle: Any) -> Any:
        return handle[0]

    def warm(self) -> None:
        pass

    def close(self) -> None:
        for c, probe in self.idle:
            c.close()
            if probe is not None:
                probe.close()


class Poolkit(Peer):
    name = "poolkit"

    def __init__(self, connect: Counting, size: int) -> None:
        super().__init__(connect, size)
        import poolkit

        self.pool = poolkit.Pool(connect, max_size=size, name="bench")
        self.checkout = self.pool.acquire
        self.checkin = poolkit.PooledConnection.close

    def driver_conn(self, handle: Any) -> Any:
        return handle.driver_connection

    def close(self) -> None:
        self.pool.close(timeout=1)


class QueuePoolPeer(Peer):
    name = "queuepool"
    pre_ping = False

    URLS = {
        "sqlite": "sqlite://",
        "postgresql": "postgresql+psycopg://",
        "mariadb": "mysql+pymysql://",
        "dqlite": "dqlite://",
    }

    def __init__(self, connect: Counting, size: int, overflow: int = 0, backend: str = "sqlite") -> None:
        super().__init__(connect, size)
        from sqlalchemy import create_engine
        from sqlalchemy.pool import QueuePool
        from sqlalchemy.pool.base import _ConnectionFairy  # what pool.connect() hands out

        # through an engine, as SQLAlchemy users run it: pre_ping needs the dialect
        self.engine = create_engine(
            self.URLS[backend],
            creator=connect,
            poolclass=QueuePool,
            pool_size=size,
            max_overflow=overflow,
            pool_pre_ping=self.pre_ping,
        )
        self.pool = self.engine.pool
        self.checkout = self.pool.connect
        self.checkin = _ConnectionFairy.close

    def driver_conn(self, handle: Any) -> Any:
        return handle.dbapi_connection  # queries go through the fairy, as pool.connect() users run them

    def close(self) -> None:
        self.engine.dispose()


class QueuePoolPrePing(QueuePoolPeer):
    name = "queuepool_preping"
    pre_ping = True


class PsycopgPool(Peer):
    name = "psycopg_pool"
    check = False

    def __init__(self, connect: Counting, size: int, dsn: str = "", min_size: int | None = None) -> None:
        """``min_size``: connections opened up front, and waited for (default:
        ``size``); 0 starts empty, as the spike scenario needs."""
        super().__init__(connect, size)
        from psycopg_pool import ConnectionPool

        delay = connect.delay

        def configure(conn: Any) -> None:
            if delay:
                threading.Event().wait(delay)
            with connect.lock:
                connect.opened.append(conn)

        self.pool = ConnectionPool(
            dsn,
            min_size=size if min_size is None else min_size,
            max_size=size,
            open=True,
            configure=configure,
            kwargs={"autocommit": True},  # as every other peer's connections (backends.py)
            check=ConnectionPool.check_connection if self.check else None,
            name=self.name,
        )
        if min_size is None:
            self.pool.wait(timeout=30)
        self.checkout = self.pool.getconn
        self.checkin = self.pool.putconn

    def close(self) -> None:
        self.pool.close(timeout=1)


class PsycopgPoolCheck(PsycopgPool):
    name = "psycopg_pool_check"
    check = True


class DBUtilsPeer(Peer):
    name = "dbutils"

    def __init__(self, connect: Counting, size: int) -> None:
        super().__init__(connect, size)
        from dbutils.pooled_db import PooledDB, PooledDedicatedDBConnection  # what connection() hands out

        self.pool = PooledDB(connect, mincached=0, maxcached=size, maxconnections=size, blocking=True)
        self.checkout = self.pool.connection  # maxshared=0: dedicated connections
        self.checkin = PooledDedicatedDBConnection.close

    def driver_conn(self, handle: Any) -> Any:
        # PooledDedicatedDBConnection -> SteadyDBConnection -> driver; queries
        # go through the first, as DBUtils users run them (its cursors are "tough")
        return handle._con._con

    def close(self) -> None:
        self.pool.close()


CLASSES: dict[str, type[Peer]] = {
    "raw": Raw,
    "bare": Bare,
    "poolkit": Poolkit,
    "queuepool": QueuePoolPeer,
    "queuepool_preping": QueuePoolPrePing,
    "psycopg_pool": PsycopgPool,
    "psycopg_pool_check": PsycopgPoolCheck,
    "dbutils": DBUtilsPeer,
}

_NEEDS = {
    "queuepool": "sqlalchemy",
    "queuepool_preping": "sqlalchemy",
    "psycopg_pool": "psycopg_pool",
    "psycopg_pool_check": "psycopg_pool",
    "dbutils": "dbutils",
}


def parse_names(value: str) -> list[str]:
    """The peers named in a comma-separated list; ValueError naming the
    unknown ones."""
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in names if p not in CLASSES]
    if unknown:
        raise ValueError(f"unknown pool(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return names


def available(name: str, backend: str) -> str | None:
    """None when the peer can run on ``backend``, else why not."""
    if name.startswith("psycopg_pool") and backend != "postgresql":
        return "psycopg_pool is for PostgreSQL only"
    module = _NEEDS.get(name)
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'poolkit[bench]')"
    return None


def make(
    name: str,
    connect: Counting,
    size: int,
    *,
    dsn: str = "",
    overflow: int = 0,
    backend: str = "sqlite",
    min_size: int | None = None,
) -> Peer:
    """``min_size`` is psycopg_pool's (see :class:`PsycopgPool`); the other
    pools open connections on demand."""
    cls = CLASSES[name]
    if issubclass(cls, PsycopgPool):
        return cls(connect, size, dsn=dsn, min_size=min_size)
    if issubclass(cls, QueuePoolPeer):
        return cls(connect, size, overflow=overflow, backend=backend)
    return cls(connect, size)
