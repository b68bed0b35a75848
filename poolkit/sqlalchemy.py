"""poolkit under any SQLAlchemy engine.

Two ways in:

- ``create_engine(url, poolclass=PoolkitPool, pool_size=10, poolkit_options={...})``;
- the plugin, registered under the ``sqlalchemy.plugins`` entry point as
  ``poolkit``: ``create_engine("postgresql+psycopg://...?plugin=poolkit")`` or
  ``create_engine(url, plugins=["poolkit"], poolkit_max_size=20)``. Options
  named ``poolkit_<option>`` (keyword arguments or URL query parameters) map
  onto :class:`poolkit.Pool` options and never reach the driver.

The plugin also installs the error listener (:func:`instrument` does it for
an engine built with ``poolclass=``): ``BAD_CONNECTION`` and ``NOT_LEADER``
become disconnects; ``NOT_LEADER`` invalidates the whole pool, so a
read-only node after a failover heals the engine; a connection lost during
COMMIT reaches the caller as :class:`poolkit.AmbiguousCommitError`.

poolkit's liveness probe replaces ``pool_pre_ping``'s round trip; a real
ping still runs after ``ping_after`` seconds idle.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import event, exc, text
from sqlalchemy.engine import CreateEnginePlugin, Engine
from sqlalchemy.engine.url import URL
from sqlalchemy.pool import Pool as SAPool
from sqlalchemy.pool.base import _ConnectionRecord

from poolkit.classify import Category, classify, remember
from poolkit.drivers import DelegatingDriver, driver_for_connection
from poolkit.errors import AmbiguousCommitError, ManagedTransactionError, PoolError, PoolTimeout
from poolkit.pool import _OWNED_WHY, Pool, PooledConnection, _Held
from poolkit.retry import (
    Retry,
    _Attempt,
    _policy_from,
    bounded_ledger_insert,
    check_call,
    check_result,
    check_work,
    ledger_wait,
    make_retrying,
    safe_to_retry,
)

__all__ = ["PoolkitPlugin", "PoolkitPool", "instrument", "run"]

logger = logging.getLogger("poolkit.sqlalchemy")

T = TypeVar("T")

PREFIX = "poolkit_"
# Pool options a plugin may set: every keyword of poolkit.Pool but these
_NOT_OPTIONS = {"connect", "driver", "clock"}
POOL_OPTIONS = frozenset(p for p in inspect.signature(Pool.__init__).parameters if p not in _NOT_OPTIONS | {"self"})


class _RecordDriver(DelegatingDriver):
    """poolkit's pool holds SQLAlchemy connection records; every question about
    one goes to the driver of the DBAPI connection inside it (None once
    SQLAlchemy invalidated it)."""

    name = "sqlalchemy"
    connect_is = "the engine's connect event listener"

    def __init__(self, dispatch: Any) -> None:
        self._dispatch = dispatch  # the SQLAlchemy pool's events

    def unwrap(self, conn: Any) -> Any:
        return conn.dbapi_connection

    def reset_session(self, conn: Any) -> None:
        super().reset_session(conn)
        # The reset put the session's settings back to the server's defaults,
        # and with them what SQLAlchemy's connect listeners set: the dialect's
        # (create_engine(isolation_level=...) on MySQL is a SET SESSION) and
        # the application's own. Run them again, as for a new connection.
        self._dispatch.connect(conn.dbapi_connection, conn)


class PoolkitPool(SAPool):
    """A SQLAlchemy pool backed by :class:`poolkit.Pool`.

    ``pool_size + max_overflow`` is poolkit's ``max_size``, ``timeout`` its
    ``timeout`` and ``recycle`` its ``max_lifetime``; ``poolkit_options``
    passes any other :class:`poolkit.Pool` option. SQLAlchemy's pool events
    (connect, checkout, checkin, reset, invalidate, close) fire as they do
    with ``QueuePool``.
    """

    def __init__(
        self,
        creator: Any,
        pool_size: int = 10,
        max_overflow: int = 0,
        timeout: float = 30.0,
        recycle: int = -1,
        poolkit_options: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(creator, recycle=-1, **kw)  # poolkit retires old connections itself
        options = dict(poolkit_options or {})
        unknown = set(options) - POOL_OPTIONS
        if unknown:
            raise exc.ArgumentError(f"unknown poolkit option(s): {', '.join(sorted(unknown))}")
        options.setdefault("max_size", pool_size + max_overflow)
        options.setdefault("timeout", timeout)
        if recycle is not None and recycle > 0:
            options.setdefault("max_lifetime", recycle)
        options.setdefault("name", self._orig_logging_name or "sqlalchemy")
        self._args = (pool_size, max_overflow, timeout, recycle, poolkit_options)
        self.poolkit = Pool(self._new_record, driver=_RecordDriver(self.dispatch), **options)
        self._checked_out: dict[Any, PooledConnection] = {}

    def _new_record(self) -> _ConnectionRecord:
        return _ConnectionRecord(self)  # fires SQLAlchemy's connect / first_connect events

    def _do_get(self) -> Any:
        try:
            proxy = self.poolkit.acquire()
        except PoolTimeout as e:
            raise exc.TimeoutError(f"{e} (poolkit)", code="3o7r") from e
        rec = proxy.driver_connection
        self._checked_out[rec] = proxy
        return rec

    def _do_return_conn(self, record: Any) -> None:
        proxy = self._checked_out.pop(record, None)
        if proxy is not None:
            proxy.close()

    def _invalidate(self, connection: Any, exception: BaseException | None = None, _checkin: bool = True) -> None:
        # the whole pool, by generation: what NOT_LEADER needs after a failover
        self.poolkit.invalidate()
        if _checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)

    def dispose(self) -> None:
        self.poolkit.close(timeout=0)

    def recreate(self) -> PoolkitPool:
        pool_size, max_overflow, timeout, recycle, options = self._args
        return self.__class__(
            self._creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            recycle=recycle,
            poolkit_options=options,
            pre_ping=self._pre_ping,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        return f"PoolkitPool {self.poolkit!r} {self.poolkit.stats()}"


def _parse(value: Any) -> Any:
    """A URL query value as the Python value a Pool option wants."""
    if isinstance(value, tuple):
        value = value[-1]
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class PoolkitPlugin(CreateEnginePlugin):
    """``create_engine(url, plugins=["poolkit"], poolkit_max_size=20)``."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        options: dict[str, Any] = {}
        for key in list(kwargs):
            if key.startswith(PREFIX):
                options[key[len(PREFIX) :]] = kwargs.pop(key)
        for key, value in url.query.items():
            if key.startswith(PREFIX):
                options.setdefault(key[len(PREFIX) :], _parse(value))
        unknown = set(options) - POOL_OPTIONS
        if unknown:
            raise exc.ArgumentError(
                "unknown poolkit option(s): "
                + ", ".join(PREFIX + u for u in sorted(unknown))
                + f"; known: {', '.join(sorted(PREFIX + o for o in POOL_OPTIONS))}"
            )
        self.options = options
        if "poolclass" not in kwargs and "pool" not in kwargs:
            kwargs["poolclass"] = PoolkitPool

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query([k for k in url.query if k.startswith(PREFIX)])

    def handle_pool_kwargs(self, pool_cls: type, pool_args: dict[str, Any]) -> None:
        if isinstance(pool_cls, type) and issubclass(pool_cls, PoolkitPool):
            pool_args["poolkit_options"] = {**self.options, **(pool_args.get("poolkit_options") or {})}

    def engine_created(self, engine: Engine) -> None:
        instrument(engine)


_COMMITTING = "poolkit_committing"


def instrument(engine: Engine) -> Engine:
    """Install poolkit's error handling on ``engine`` (the plugin does it for you)."""
    if getattr(engine, "_poolkit_instrumented", False):
        return engine
    engine._poolkit_instrumented = True  # type: ignore[attr-defined]

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.info.pop(_COMMITTING, None)

    @event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        conn.info[_COMMITTING] = True

    @event.listens_for(engine, "handle_error")
    def _handle_error(ctx: Any) -> BaseException | None:
        original = ctx.original_exception
        if original is None or ctx.is_pre_ping:
            return None
        committing = False
        if ctx.connection is not None and ctx.statement is None:
            try:
                committing = bool(ctx.connection.info.pop(_COMMITTING, False))
            except Exception:
                committing = False
        raw = None  # the DBAPI connection, for what only it can tell (read-only by the caller's choice)
        if ctx.connection is not None and not ctx.connection.invalidated:  # (an invalidated one would reconnect)
            try:
                raw = ctx.connection.connection.dbapi_connection
            except Exception:
                raw = None
        c = classify(original, during_commit=committing, connection=raw)
        remember(original, c)  # for run()'s retry, which decides once the connection is gone
        if c.category in (Category.BAD_CONNECTION, Category.NOT_LEADER, Category.AMBIGUOUS):
            ctx.is_disconnect = True
            # only NOT_LEADER retires every connection: the others point at the same old leader
            ctx.invalidate_pool_on_disconnect = c.category is Category.NOT_LEADER
            if c.category is Category.NOT_LEADER:
                logger.warning("engine %s: %s; invalidating the pool", engine.url.render_as_string(), c.reason)
                _tell_not_leader(engine, ctx.connection)
        if c.category is Category.AMBIGUOUS and not isinstance(original, AmbiguousCommitError):
            return AmbiguousCommitError(
                f"the outcome of the commit is unknown ({c.reason}): it may or may not have been applied"
            )
        return None

    return engine


def _tell_not_leader(engine: Engine, connection: Any) -> None:
    """A ``creator=poolkit.failover(...)`` (anything with ``not_leader``)
    learns which node refused, as poolkit's own pool tells its connect."""
    hook = getattr(getattr(engine.pool, "_creator", None), "not_leader", None)
    if hook is None or connection is None:
        return
    try:
        hook(connection.connection.dbapi_connection)
    except Exception as e:
        logger.warning("engine %s: the creator's not_leader() raised %r", engine.url.render_as_string(), e)


def _engine_of(bind: Any) -> Engine:
    if isinstance(bind, Engine):
        return bind
    kw = getattr(bind, "kw", None)  # a sessionmaker
    if kw and isinstance(kw.get("bind"), Engine):
        return kw["bind"]  # type: ignore[no-any-return]
    raise TypeError(f"run() takes an Engine or a sessionmaker bound to one, not {type(bind).__name__}")


_RUN = "poolkit.sqlalchemy.run()"

# The ledger tables run() has created (if not there) on each engine: once per
# engine and table, as pool.ledger does once per pool. Its own transaction,
# with a COMMIT: it was run on every call with a request id, about 700 us on
# PostgreSQL here.
_LEDGERS: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()
_LEDGERS_LOCK = threading.Lock()


class _Watch:
    """The connection that ``run``'s work runs on, in this context: a commit
    on it is refused (see :func:`_refuse_commit`)."""

    __slots__ = ("conn", "refused")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.refused = False


_WATCHED: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("poolkit_sqlalchemy_run", default=None)


def _refuse_commit(conn: Any) -> None:
    """The engine's ``commit`` event: refuse a commit of the connection
    that :func:`run`'s work runs on, before SQLAlchemy sends it.
    (SQLAlchemy has marked its transaction ended by then, and would put the
    connection back in its pool with the transaction still open: ``run``
    discards the connection, which rolls it back.) A rollback is not
    refused: SQLAlchemy's session rolls back by itself when a flush fails."""
    watch = _WATCHED.get()
    if watch is not None and watch.conn is conn:
        watch.refused = True
        raise ManagedTransactionError(
            f"commit() inside {_RUN}, {_OWNED_WHY} The COMMIT was not sent; the connection will be "
            "discarded, which rolls the transaction back."
        )


def _watch_commits(engine: Engine) -> None:
    if not event.contains(engine, "commit", _refuse_commit):
        event.listen(engine, "commit", _refuse_commit, insert=True)


def _refuse_autocommit(conn: Any) -> None:
    """``run`` needs a transaction: on an AUTOCOMMIT connection each
    statement commits as it runs, so a failed attempt would leave half its
    work (and a request id) committed, and a retry would run it again."""
    probe = getattr(conn, "_is_autocommit_isolation", None)  # SQLAlchemy 1.4-2.1; no round trip
    autocommit = probe() if probe is not None else conn.get_isolation_level() == "AUTOCOMMIT"
    if autocommit:
        raise exc.ArgumentError(
            f"{_RUN} needs a transaction, and this connection's isolation level is AUTOCOMMIT (each "
            "statement commits as it runs, so a retry would repeat what a failed attempt committed): pass "
            "an engine with a level that has transactions, such as engine.execution_options(isolation_level="
            '"READ COMMITTED") (SQLite: "SERIALIZABLE")'
        )


def _begin_on_sqlite(conn: Any) -> None:
    """sqlite3 begins a transaction only before a write (SQLAlchemy's SQLite
    notes, "Serializable isolation / Savepoints / Transactional DDL"): the
    work's reads before its first write ran outside it, and a
    read-modify-write lost updates. ``run`` begins it before the work, as
    pool.run does: poolkit's sqlite3 driver, on the DBAPI connection."""
    if conn.dialect.name != "sqlite":
        return
    dbapi = conn.connection.dbapi_connection
    driver = driver_for_connection(dbapi)
    if driver.name == "sqlite3":
        if getattr(dbapi, "autocommit", None) is True:
            # Python 3.12+: sqlite3's commit() and rollback() do nothing in
            # this mode, so SQLAlchemy's would leave run's transaction open
            # and the work uncommitted (while run reported success)
            raise exc.ArgumentError(
                f"{_RUN} needs a transaction, and this sqlite3 connection is in autocommit mode "
                "(autocommit=True), where SQLAlchemy's commit() does nothing: the work would never be "
                'committed. Open it with autocommit=False or sqlite3\'s default (connect_args={"autocommit": ...})'
            )
        driver.begin(dbapi)


def _went_on() -> ManagedTransactionError:
    return ManagedTransactionError(
        f"the work of {_RUN} called commit(), and went on when it was refused; nothing is committed "
        "(the connection is discarded): let the run commit"
    )


def _work(fn: Callable[[Any], T], target: Any, conn: Any) -> T:
    """``fn(target)`` with a commit on ``conn`` refused, and what it returns
    checked (see :func:`poolkit.retry.check_result`)."""
    watch = _Watch(conn)
    token = _WATCHED.set(watch)
    # a poolkit-backed engine's connection counts as held by this thread while
    # the work runs: a run nested in it that would wait for itself fails at once
    pk: Pool | None = getattr(conn.engine.pool, "poolkit", None)
    holding = _Held(pk) if pk is not None else None
    try:
        result = fn(target)
    except BaseException as e:
        if not watch.refused:
            raise
        conn.invalidate()
        if isinstance(e, ManagedTransactionError):
            raise
        raise _went_on() from e  # SQLAlchemy's PendingRollbackError, most likely
    finally:
        _WATCHED.reset(token)
        if holding is not None:
            holding.release()
    if watch.refused:
        conn.invalidate()
        raise _went_on()
    check_result(result, _RUN)
    return result


def run(
    bind: Any,
    fn: Callable[[Any], T],
    *,
    idempotent: bool = False,
    request_id: str | None = None,
    retry: Retry | bool | None = None,
    ledger_table: str = "poolkit_requests",
) -> T:
    """Run ``fn`` in a transaction under poolkit's retry rules (the same
    categories, bounds, ``idempotent=`` and ``request_id=`` as ``pool.run``).

    ``bind`` is an ``Engine`` (``fn`` gets a ``Connection``) or a
    ``sessionmaker`` (``fn`` gets a ``Session``; the unit of work is flushed
    and committed after ``fn`` returns).
    """
    from poolkit.retry import Ledger

    check_work(fn, _RUN)
    check_call(idempotent, request_id)
    engine = _engine_of(bind)
    root = engine
    while (proxied := getattr(root, "_proxied", None)) is not None:
        root = proxied  # engine.execution_options(...) makes a new engine each call; its root's events fire for it
    _watch_commits(root)
    pk: Pool | None = getattr(engine.pool, "poolkit", None)
    policy = _policy_from(pk.retry if pk is not None else Retry.default(), retry)
    ledger = Ledger(ledger_table) if request_id is not None else None
    is_session = not isinstance(bind, Engine)
    state = _Attempt()

    def should_retry(e: BaseException) -> bool:
        if isinstance(e, (PoolError, exc.TimeoutError)) and not isinstance(e, AmbiguousCommitError):
            return False
        c = state.classify(None, e)
        state.failed(c.category)
        return safe_to_retry(c.category, state.stage, idempotent=idempotent, request_id=request_id)

    def before_sleep(rs: Any) -> None:
        if pk is not None:
            pk._count_retry()
        e = rs.outcome.exception() if rs.outcome is not None else None
        c = state.classify(None, e) if e is not None else None
        logger.warning(
            "engine: attempt %d of %d failed at %s (%s); retrying in %.2fs",
            rs.attempt_number,
            policy.attempts,
            state.stage,
            f"{c.category.name}: {c.reason}" if c else e,
            rs.upcoming_sleep,
        )

    def first_claim(target: Any, conn: Any) -> bool:
        """Insert the id first, in the work's transaction (see pool.run), on
        ``target`` (the session or ``conn``): False when an earlier attempt
        or call committed it already. On a poolkit engine its wait for
        another transaction holding the id ends at the budget's deadline, as
        in pool.run (see poolkit.retry.ledger_wait)."""
        assert ledger is not None and request_id is not None
        lock_wait = ledger_wait(policy, started)
        pool, rec = None, None
        if lock_wait is not None and isinstance(engine.pool, PoolkitPool):
            proxy = engine.pool._checked_out.get(conn.connection._connection_record)
            pool, rec = engine.pool.poolkit, (proxy._rec if proxy is not None else None)
        try:
            with bounded_ledger_insert(pool, rec, lock_wait, request_id):
                target.execute(text(f"INSERT INTO {ledger.table} (request_id) VALUES (:rid)"), {"rid": request_id})
        except exc.IntegrityError:
            target.rollback()
            logger.info("engine: request %r already committed; not run again", request_id)
            return False
        return True

    started = time.monotonic()
    for attempt in make_retrying(policy, should_retry, before_sleep, state):
        with attempt:
            state.stage = "checkout"
            if ledger is not None and ledger.table not in _LEDGERS.get(root, ()):
                with engine.begin() as conn:
                    conn.execute(text(ledger.create_sql))
                with _LEDGERS_LOCK:
                    _LEDGERS.setdefault(root, set()).add(ledger.table)
            if is_session:
                session = bind()
                try:
                    session.begin()
                    conn = session.connection()  # the checkout, here: nothing of the work is sent yet
                    _refuse_autocommit(conn)
                    state.stage = "begin"
                    _begin_on_sqlite(conn)
                    state.stage = "work"
                    if ledger is not None and not first_claim(session, conn):
                        return None  # type: ignore[return-value]
                    result = _work(fn, session, conn)
                    state.stage = "commit"
                    session.commit()
                    return result
                finally:
                    session.close()
            with engine.connect() as conn:
                state.stage = "begin"
                conn.begin()
                _refuse_autocommit(conn)
                _begin_on_sqlite(conn)
                state.stage = "work"
                if ledger is not None and not first_claim(conn, conn):
                    return None  # type: ignore[return-value]
                result = _work(fn, conn, conn)
                state.stage = "commit"
                conn.commit()
                return result
    raise AssertionError("unreachable")  # pragma: no cover
