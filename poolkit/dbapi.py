"""The DB-API drop-in: pooled connections behind the PEP 249 module interface.

Change one import and code written against a DB-API module gets pooling,
health checks and error classification::

    from poolkit.dbapi import psycopg          # instead of: import psycopg

    conn = psycopg.connect("dbname=test")      # a pooled connection
    ...
    conn.close()                               # back to the pool

Tools that accept a DB-API module (SQLAlchemy's ``module=``, for one)
accept these too. :func:`wrap` makes one for any driver module; the
ready-made ones (``poolkit.dbapi.sqlite3``, ``.psycopg``, ``.pymysql``,
``.dqlite``) are imported lazily.

Connections opened with the same arguments share one pool, created on
first use. Pool options go to :func:`wrap`, or per target to ``connect()``
through the ``poolkit=`` keyword, which the driver never sees::

    conn = psycopg.connect("dbname=test", poolkit={"max_size": 20})

A closed connection, and every cursor of it, raises exactly what the
driver raises for a closed connection of its own. As the driver's
``connect()`` gives a new session and its ``close()`` ends it, a psycopg or
PyMySQL session is reset when the caller closes it, so that a lock it held
is freed then (``reset_session=False`` opts out), and
sqlite3 and dqlite connections are opened with ``check_same_thread=False``
unless the caller says otherwise.
"""

from __future__ import annotations

import atexit
import importlib
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from poolkit.drivers import driver_for_module
from poolkit.errors import ConnectionReturned
from poolkit.pool import Pool, PooledConnection, PooledCursor

__all__ = ["Connection", "Cursor", "PooledModule", "wrap"]

POOL_KEYWORD = "poolkit"

_EXCEPTIONS = (
    "Warning",
    "Error",
    "InterfaceError",
    "DatabaseError",
    "DataError",
    "OperationalError",
    "IntegrityError",
    "InternalError",
    "ProgrammingError",
    "NotSupportedError",
)

# Drivers whose connections refuse any thread but the one that opened them
# unless opened with check_same_thread=False. A pool hands a connection to
# whichever thread asks next, one at a time (and opens the first one in a
# thread of its own), so the drop-in opens them so unless the caller says
# otherwise (True: the pool refuses it, naming the keyword). Driver name ->
# the keyword's position in connect(), None if it is keyword-only.
_THREAD_BOUND: dict[str, int | None] = {"sqlite3": 4, "dqlite": None}


def _unbound(driver: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs``, with check_same_thread=False for a thread-bound driver if
    the caller did not give it."""
    if driver not in _THREAD_BOUND or "check_same_thread" in kwargs:
        return kwargs
    position = _THREAD_BOUND[driver]
    if position is not None and len(args) > position:
        return kwargs  # given by position
    return {**kwargs, "check_same_thread": False}


# Drivers whose sessions the pool can reset (PostgreSQL: the parts of
# DISCARD ALL that keep psycopg's prepared statements; MySQL:
# COM_RESET_CONNECTION). The driver's connect() gives a new session, so the
# drop-in's resets each one it takes back by default: nothing of an earlier
# caller's (SET ROLE, search_path, session variables, temporary tables,
# advisory or GET_LOCK locks) reaches the next. reset_session=False opts out.
_RESETS = frozenset({"psycopg", "pymysql"})


# How each driver behaves once a connection is closed, so the drop-in does the same.
# name -> (error factory, cursor() still works, second close() raises)


def _closed_behaviour(module: Any, driver: str) -> tuple[Callable[[], BaseException], bool, Callable[[], None]]:
    def nothing() -> None:
        pass

    if driver == "sqlite3":
        return (lambda: module.ProgrammingError("Cannot operate on a closed database."), False, nothing)
    if driver == "psycopg":
        return (lambda: module.OperationalError("the connection is closed"), False, nothing)
    if driver == "pymysql":

        def already() -> None:
            raise module.err.Error("Already closed")

        return (lambda: module.err.InterfaceError(0, ""), True, already)
    cls = getattr(module, "InterfaceError", None) or module.Error
    return (lambda: cls("the connection is closed"), False, nothing)


def _freeze(value: Any) -> Any:
    """A hashable key for connect() arguments."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class PooledModule(types.ModuleType):
    """A DB-API module whose ``connect()`` hands out pooled connections.

    Everything but ``connect`` is the driver's own: the exception classes
    (``except psycopg.OperationalError`` keeps working), the type objects
    and constructors, ``paramstyle``, ``apilevel``, ``threadsafety``.
    """

    def __init__(self, module: types.ModuleType, **pool_options: Any) -> None:
        super().__init__(f"poolkit.dbapi({module.__name__})", module.__doc__)
        if not callable(getattr(module, "connect", None)):
            raise TypeError(f"{module!r} is not a DB-API module: it has no connect()")
        if "connect" in pool_options:
            raise TypeError("pool options cannot include 'connect': the module's connect() is used")
        Pool(lambda: None, **pool_options).close()  # check the options now, not at first connect
        self.driver_module = module
        self._driver_name = driver_for_module(module.__name__).name
        self.pool_options = dict(pool_options)
        if self._driver_name in _RESETS:
            self.pool_options.setdefault("reset_session", True)
        # close() ends the session, as the driver's own: what it held (a
        # session lock) is freed then, not when the connection is next handed out
        self.pool_options.setdefault("reset_on", "return")
        self._closed_error, self._cursor_after_close, self._second_close = _closed_behaviour(module, self._driver_name)
        self._lock = threading.Lock()  # protects _pools and _options
        self._pools: dict[Any, Pool] = {}
        self._options: dict[Any, dict[str, Any]] = {}  # the options each pool was made with
        _MODULES.add(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self.driver_module, name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self.driver_module)) | {"connect", "pools", "close_all", "driver_module"})

    def connect(self, *args: Any, **kwargs: Any) -> Connection:
        """A pooled connection to the target these arguments name."""
        options = kwargs.pop(POOL_KEYWORD, None)
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"{POOL_KEYWORD}= takes a dict of pool options, not {type(options).__name__}")
        key = (_freeze(args), _freeze(kwargs))
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None and options and options != self._options[key]:
                raise ValueError(
                    f"a pool for this target exists already with options {self._options[key]!r}; got {options!r}"
                )
            if pool is None or pool.closed:
                merged = {**self.pool_options, **(options or {})}
                merged.setdefault("name", f"{self.driver_module.__name__}-{len(self._pools) + 1}")
                target = self.driver_module.connect
                call_kwargs = _unbound(self._driver_name, args, kwargs)

                def connect_target() -> Any:
                    return target(*args, **call_kwargs)

                pool = Pool(connect_target, **merged)
                self._pools[key] = pool
                self._options[key] = options or {}
        return Connection(self, pool.acquire())

    def pools(self) -> dict[Any, Pool]:
        """The pools this module made, by target (for stats)."""
        with self._lock:
            return dict(self._pools)

    def close_all(self) -> None:
        """Close every pool (also done at interpreter exit)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            self._options = {}
        for p in pools:
            p.close(timeout=1.0)

    def __repr__(self) -> str:
        return f"<poolkit.dbapi module for {self.driver_module.__name__}: {len(self._pools)} pools>"


_MODULES: weakref.WeakSet[PooledModule] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for m in list(_MODULES):
        m.close_all()


class Connection:
    """A pooled connection behind the driver's connection interface."""

    __slots__ = ("_module", "_proxy")

    def __init__(self, module: PooledModule, proxy: PooledConnection) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_proxy", proxy)

    def _open(self) -> PooledConnection:
        proxy: PooledConnection = self._proxy
        if proxy.closed:
            raise self._module._closed_error()
        return proxy

    def cursor(self, *args: Any, **kwargs: Any) -> Cursor:
        proxy = self._proxy
        if proxy.closed:
            if self._module._cursor_after_close:
                return _make_cursor(None, self)
            raise self._module._closed_error()
        return _make_cursor(proxy.cursor(*args, **kwargs), self)

    def execute(self, *args: Any, **kwargs: Any) -> Cursor:
        """For drivers whose connections have ``execute`` (sqlite3, psycopg)."""
        return _make_cursor(self._open().execute(*args, **kwargs), self)

    def commit(self) -> None:
        self._open().commit()

    def rollback(self) -> None:
        self._open().rollback()

    def close(self) -> None:
        """Return the connection to its pool (uncommitted work is rolled back)."""
        proxy = self._proxy
        if proxy.closed:
            self._module._second_close()
            return
        proxy.close()

    @property
    def closed(self) -> Any:
        if self._proxy.closed:
            return True
        return getattr(self._proxy.driver_connection, "closed", False)

    @property
    def pooled(self) -> PooledConnection:
        """The poolkit proxy behind this connection."""
        return self._open()

    def __getattr__(self, name: str) -> Any:
        if name in _EXCEPTIONS:  # PEP 249 optional extension: the exception classes on the connection
            return getattr(self._module.driver_module, name)
        proxy = self._open()
        if name.startswith("_"):  # the driver's own, not the proxy's
            return getattr(proxy.driver_connection, name)
        # Through the proxy, and what it guards: a setting (PyMySQL's
        # conn.autocommit(True)) is undone on close; a call that cannot be
        # undone (sqlite3's set_trace_callback) closes the connection then;
        # a ping never reconnects, and PyMySQL's connect() is not there.
        # Read from the driver's connection, they reached the next caller.
        return getattr(proxy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # any attribute: undone on close(), as a new driver connection would not have it
        self._open()._set_setting(name, value)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # as the driver's own connection does
        name = self._module._driver_name
        if name == "pymysql":
            self.close()
            return
        if not self._proxy.closed:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        if name == "psycopg":
            self.close()

    def __repr__(self) -> str:
        return f"<pooled {self._module.driver_module.__name__} connection {'closed' if self._proxy.closed else 'open'}>"


class Cursor:
    """A driver cursor whose errors the pool watches, closed with its connection."""

    __slots__ = ("_connection", "_cursor")

    def __init__(self, cursor: PooledCursor | None, connection: Connection) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_connection", connection)

    def _cur(self) -> PooledCursor:
        cur: PooledCursor | None = self._cursor
        if cur is None or self._connection._proxy.closed:
            raise self._connection._module._closed_error()
        return cur

    @property
    def connection(self) -> Connection:
        conn: Connection = self._connection
        return conn

    def execute(self, *args: Any, **kwargs: Any) -> Cursor:
        try:
            self._cur().execute(*args, **kwargs)
        except ConnectionReturned:
            raise self._connection._module._closed_error() from None
        return self

    def executemany(self, *args: Any, **kwargs: Any) -> Cursor:
        try:
            self._cur().executemany(*args, **kwargs)
        except ConnectionReturned:
            raise self._connection._module._closed_error() from None
        return self

    def fetchone(self) -> Any:
        return self._cur().fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        return self._cur().fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        return self._cur().fetchall()

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def close(self) -> None:
        cur = self._cursor
        if cur is not None:
            cur.close()

    def __getattr__(self, name: str) -> Any:
        cur = self._cursor
        if cur is None:
            raise self._connection._module._closed_error()
        return getattr(cur._cursor, name)  # description, rowcount, lastrowid...: readable after close too

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cur()._cursor, name, value)


class _ContextCursor(Cursor):
    """For drivers whose cursors are context managers."""

    __slots__ = ()

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _make_cursor(cur: PooledCursor | None, connection: Connection) -> Cursor:
    raw = cur._cursor if cur is not None else None
    if raw is None:
        # a driver that still hands out cursors on a closed connection (PyMySQL)
        has_ctx = connection._module._driver_name == "pymysql"
    else:
        has_ctx = hasattr(type(raw), "__enter__")
    return _ContextCursor(cur, connection) if has_ctx else Cursor(cur, connection)


def wrap(module: types.ModuleType | str, **pool_options: Any) -> PooledModule:
    """A DB-API module like ``module`` whose ``connect()`` is pooled.
    ``pool_options`` are :class:`poolkit.Pool` options, for every target."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    return PooledModule(module, **pool_options)


_READY = {"sqlite3": "sqlite3", "psycopg": "psycopg", "pymysql": "pymysql", "dqlite": "dqlitedbapi"}
_ready_lock = threading.Lock()
_ready: dict[str, PooledModule] = {}


def __getattr__(name: str) -> PooledModule:
    """``poolkit.dbapi.sqlite3`` and friends, made on first use."""
    target = _READY.get(name)
    if target is None:
        raise AttributeError(f"module 'poolkit.dbapi' has no attribute {name!r}")
    with _ready_lock:
        mod = _ready.get(name)
        if mod is None:
            options: dict[str, Any] = {}
            mod = _ready[name] = wrap(target, **options)
        return mod
