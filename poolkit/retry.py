"""Running work with retries that are safe to take.

What ``pool.run`` retries, by the category of the error (see
:mod:`poolkit.classify`):

- ``RETRYABLE``: always; the whole function runs again in a new transaction.
- ``NOT_LEADER``: always; the write was rejected before it ran, and the pool
  has invalidated itself, so the next attempt reaches the new leader.
- ``BAD_CONNECTION``: when the work is ``idempotent=True``, when it carries a
  ``request_id``, or when the failure came before any of the work was sent.
- ``AMBIGUOUS`` (the commit may have been applied): when the work is
  ``idempotent=True``, or when it carries a ``request_id``: each attempt
  first inserts the id into the ledger, in the work's transaction, and
  returns without running the work if that finds the id committed. An
  insert still waiting for another transaction holding the id at the
  deadline is cut off (:func:`ledger_wait`): ``AmbiguousCommitError``.
- ``PERMANENT``: never.

Retries are bounded by a count and by a deadline, with exponential backoff
and jitter (tenacity), except that the first connection a call loses under
its work is retried at once (see :meth:`_Attempt.failed`). The default
budget, 10 attempts within 15 seconds, rides out a server restart or a
leader election of a few seconds. Turn retries off per call
(``retry=False``), per pool (``Pool(retry=False)``) or for the whole
process (``POOLKIT_RETRY=off`` in the environment).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import math
import os
import re
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from poolkit.classify import Category, Classification, classify, remembered
from poolkit.drivers import IN_TRANSACTION
from poolkit.errors import AmbiguousCommitError, ManagedTransactionError, PoolError

if TYPE_CHECKING:
    from poolkit.pool import Pool, PooledConnection, _Conn

__all__ = ["RETRY_ENV", "Ledger", "Retry"]

logger = logging.getLogger("poolkit.retry")

T = TypeVar("T")

#: set to "off" (or 0, false, no) to turn every retry of the process off
RETRY_ENV = "POOLKIT_RETRY"


@dataclass(frozen=True)
class Retry:
    """A retry budget: at most ``attempts`` attempts, none started after
    ``deadline`` seconds, waiting between them a random time that grows
    exponentially from ``initial_backoff`` up to ``max_backoff``."""

    attempts: int = 10
    deadline: float = 15.0
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("deadline", "initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN too
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            if name != "deadline" and value == math.inf:  # a deadline of inf is no deadline; a wait, a hang
                raise ValueError(f"{name} must be finite, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.attempts > 1

    @classmethod
    def default(cls) -> Retry:
        return cls()

    @classmethod
    def off(cls) -> Retry:
        return cls(attempts=1)


_OFF = Retry.off()


def _env_off() -> bool:
    return os.environ.get(RETRY_ENV, "").strip().lower() in ("0", "off", "false", "no")


def _policy_from(default: Retry, retry: Retry | bool | None) -> Retry:
    """The budget for one call: ``retry`` if given, else ``default``; none at
    all when POOLKIT_RETRY=off."""
    if _env_off() or retry is False:
        return _OFF
    if retry is None or retry is True:
        return default
    if isinstance(retry, Retry):
        return retry
    raise TypeError(f"retry must be a poolkit.Retry, True, False or None, not {type(retry).__name__}")


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Ledger:
    """The table of request ids whose work committed.

    A row is inserted in the same transaction as the work, so it exists if
    and only if the work committed. Rows are never removed by poolkit on its
    own: call :meth:`prune` (``pool.prune_requests(older_than=...)``) with an
    age longer than any retry of the same id can come, e.g. a day.
    """

    def __init__(self, table: str = "poolkit_requests") -> None:
        if not isinstance(table, str) or not _IDENTIFIER.match(table):
            raise ValueError(f"ledger table must be a plain SQL identifier, got {table!r}")
        self.table = table
        self._ready = False

    @property
    def create_sql(self) -> str:
        """The table's DDL (the SQLAlchemy helper runs it too)."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "request_id VARCHAR(200) NOT NULL PRIMARY KEY, "
            "created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )

    def ensure(self, conn: PooledConnection) -> None:
        """Create the table if it is not there (once per ledger object),
        in a transaction of its own."""
        if self._ready:
            return
        cur = conn.cursor()
        try:
            cur.execute(self.create_sql)
        finally:
            cur.close()
        conn.commit()
        self._ready = True

    def _refuse_open_transaction(self, conn: PooledConnection, what: str) -> None:
        """Refuse ``what``, which ends the transaction it runs in, on a
        connection in a transaction of the caller's: its uncommitted work
        would go with it (rolled back, or committed early), and a read in it
        may see an old snapshot."""
        driver = conn.pool._driver
        assert driver is not None
        raw = conn.driver_connection
        if driver.transaction_state(raw) == IN_TRANSACTION and not driver.keeps_transaction_open(raw):
            raise PoolError(
                f"{what} on a connection in a transaction: it ends the transaction, and what the transaction "
                "has not committed would go with it. Commit or roll back first (or call it on a connection "
                "of its own)"
            )

    def committed(self, conn: PooledConnection, request_id: str) -> bool:
        """Whether work under ``request_id`` has committed. Reads in a
        transaction of its own and ends it, so it is refused on a connection
        in a transaction (inside ``pool.run`` or ``pool.transaction``, or of
        the caller's: what it has not committed would be rolled back)."""
        what = "pool.ledger.committed(), which rolls back the transaction it reads in,"
        conn._refuse_if_owned(what)
        self._refuse_open_transaction(conn, what)
        self.ensure(conn)
        ph = conn.pool._driver.placeholder(conn.driver_connection)  # type: ignore[union-attr]
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT 1 FROM {self.table} WHERE request_id = {ph}", (request_id,))
            found = cur.fetchone() is not None
        finally:
            cur.close()
        conn.rollback()
        return found

    def record(self, conn: PooledConnection, request_id: str) -> None:
        """Insert the id, in the caller's transaction. Raises the driver's
        IntegrityError when the id is there already."""
        ph = conn.pool._driver.placeholder(conn.driver_connection)  # type: ignore[union-attr]
        cur = conn.cursor()
        try:
            cur.execute(f"INSERT INTO {self.table} (request_id) VALUES ({ph})", (request_id,))
        finally:
            cur.close()

    def prune(self, conn: PooledConnection, older_than: float) -> int:
        """Delete ids recorded more than ``older_than`` seconds ago; returns
        how many. Commits (so not inside ``pool.run`` or ``pool.transaction``)."""
        what = "Ledger.prune(), which commits,"
        conn._refuse_if_owned(what)
        self._refuse_open_transaction(conn, what)
        self.ensure(conn)
        driver = conn.pool._driver
        assert driver is not None
        cutoff, arg = driver.ago(conn.driver_connection, older_than)
        cur = conn.cursor()
        try:
            cur.execute(f"DELETE FROM {self.table} WHERE created_at < {cutoff}", (arg,))
            count = int(cur.rowcount)
        finally:
            cur.close()
        conn.commit()
        return count


class _Attempt:
    """What one call's attempts got to: the stage the current one is at, and
    what the failures so far say about the next wait."""

    __slots__ = ("at_once", "bad_connections", "stage")

    def __init__(self) -> None:
        self.stage = "checkout"  # checkout -> begin -> work -> commit
        self.bad_connections = 0
        self.at_once = False  # the next attempt starts without a wait

    def classify(self, pool: Pool | None, exc: BaseException) -> Classification:
        """``exc``'s classification: the one made while its connection was
        at hand (see :func:`poolkit.classify.remember`), if any."""
        found = remembered(exc)
        if found is not None:
            return found
        committing = self.stage == "commit"
        if pool is None:  # poolkit.sqlalchemy.run on an engine of any pool
            return classify(exc, during_commit=committing)
        return pool.classify(exc, during_commit=committing)

    def failed(self, category: Category) -> None:
        """An attempt failed with ``category`` at the current stage.

        The first connection a call loses after checkout is retried at once
        (Go's database/sql retries a bad connection without a wait too): a
        pooled connection that died, cut by a proxy or killed by the server,
        says nothing about the server, and the next attempt takes another
        one. A connection that could not be opened does, and so does a second
        loss: from then on the waits back off as the budget says."""
        if category is Category.BAD_CONNECTION:
            self.bad_connections += 1
        self.at_once = category is Category.BAD_CONNECTION and self.bad_connections == 1 and self.stage != "checkout"


def safe_to_retry(category: Category, stage: str, *, idempotent: bool, request_id: str | None) -> bool:
    """Whether work that failed with ``category`` at ``stage`` (checkout,
    begin, work, commit) may run again: the one rule behind every retry."""
    if category in (Category.BAD_CONNECTION, Category.AMBIGUOUS):
        # safe when repeating is harmless, when the ledger will tell whether the
        # first attempt committed, or (connection lost) when nothing was sent yet
        return (
            idempotent
            or request_id is not None
            or (category is Category.BAD_CONNECTION and stage in ("checkout", "begin"))
        )
    return category in (Category.RETRYABLE, Category.NOT_LEADER)


def make_retrying(
    policy: Retry,
    should_retry: Callable[[BaseException], bool],
    before_sleep: Callable[[tenacity.RetryCallState], None],
    state: _Attempt,
) -> tenacity.Retrying:
    """The tenacity loop for a retry budget. ``should_retry`` tells ``state``
    how each attempt failed (:meth:`_Attempt.failed`), which tenacity asks
    before the wait: no wait when ``state.at_once``, else exponential backoff
    with jitter."""
    backoff = tenacity.wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff)

    def wait(rs: tenacity.RetryCallState) -> float:
        return 0.0 if state.at_once else backoff(rs)

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_before_delay(policy.deadline),
        wait=wait,
        retry=tenacity.retry_if_exception(should_retry),
        before_sleep=before_sleep,
        reraise=True,
    )


def _log_retry(pool: Pool, policy: Retry, state: _Attempt, rs: tenacity.RetryCallState) -> None:
    pool._count_retry()
    exc = rs.outcome.exception() if rs.outcome is not None else None
    c = state.classify(pool, exc) if exc is not None else None
    logger.warning(
        "pool %r: attempt %d of %d failed at %s (%s: %s); retrying in %.2fs",
        pool.name,
        rs.attempt_number,
        policy.attempts,
        state.stage,
        c.category.name if c else "?",
        c.reason if c else exc,
        rs.upcoming_sleep,
    )


def check_call(idempotent: Any, request_id: Any) -> None:
    """The options of a ``run`` call, checked before any checkout.
    ``idempotent`` must be a bool: a truthy string from a configuration
    ("no", "false") would let work that must not run twice be retried."""
    if not isinstance(idempotent, bool):
        raise TypeError(f"idempotent must be True or False, not {type(idempotent).__name__} {idempotent!r}")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, not {type(request_id).__name__}")
        if not 0 < len(request_id) <= 200:
            raise ValueError(f"request_id must be a non-empty str of at most 200 characters, got {len(request_id)}")


def check_work(fn: Any, where: str) -> None:
    """Refuse, before any checkout, work that ``where`` (``pool.run()``)
    cannot run in its transaction: not callable, or an async or generator
    function, whose body would run only once awaited or iterated, after the
    transaction (nothing of it would be committed, and with a request id the
    id would be). What slips through (a callable object whose ``__call__``
    is async) is caught by what it returns: see :func:`check_result`."""
    code = getattr(fn, "__code__", None)  # a function or a bound method: its flags say (0.1 us)
    if code is not None:
        if not code.co_flags & _NOT_PLAIN:
            return
    elif not callable(fn):
        raise TypeError(f"fn must be a callable taking a connection, not {type(fn).__name__}")
    # a partial, or a function that is not plain: inspect knows the ways in (1.4 us)
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"fn {_name(fn)} is an async function: {where} calls it and never awaits it, so its body would "
            "not run in the transaction; poolkit pools blocking DB-API drivers: pass a plain function"
        )
    if inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"fn {_name(fn)} is a generator function: its body runs only when iterated, after {where} has "
            "committed and returned the connection; pass a function that returns a list"
        )


_NOT_PLAIN = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_GENERATOR | inspect.CO_ITERABLE_COROUTINE


# what work returns when it has not run yet (with anything that has __await__)
_LAZY = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


def check_result(result: Any, where: str) -> None:
    """Raise TypeError, before the commit, if the work returned a coroutine,
    a generator or another awaitable: work that has not run (see
    :func:`check_work`; a callable object whose ``__call__`` is async, a
    lambda that calls a generator function)."""
    if not (isinstance(result, _LAZY) or hasattr(type(result), "__await__")):
        return
    if isinstance(result, (types.GeneratorType, types.CoroutineType)):
        result.close()  # never started: no "never awaited" warning, and none of its code runs
    raise TypeError(
        f"fn returned a {type(result).__name__}: work that runs only when awaited or iterated, after "
        f"{where} has ended the transaction: it has not run, and the transaction is rolled back"
    )


def check_open(conn: PooledConnection, where: str) -> None:
    """The work gave its connection back before ``where`` could commit."""
    if conn.closed:
        raise ManagedTransactionError(
            f"the connection was returned to its pool inside {where} (by close(), or by `with conn:`, which "
            "returns a pooled connection): its transaction was rolled back then, and nothing is committed"
        )


def _name(fn: Any) -> str:
    return repr(getattr(fn, "__qualname__", None) or type(fn).__name__)


def isolation(level: str | enum.Enum | None) -> str | None:
    """``level`` as the SQL spells it ("SERIALIZABLE", "REPEATABLE READ"...),
    from any case, with spaces, underscores or hyphens (MySQL's
    "REPEATABLE-READ"), or an enum member of that name (psycopg's
    ``IsolationLevel.SERIALIZABLE``); ValueError for another."""
    if level is None:
        return None
    from poolkit.drivers import ISOLATION_LEVELS

    text = level.name if isinstance(level, enum.Enum) else level
    name = text.replace("_", " ").replace("-", " ").strip().upper() if isinstance(text, str) else None
    if name not in ISOLATION_LEVELS:
        raise ValueError(f"isolation_level must be one of {', '.join(ISOLATION_LEVELS)} (or None), got {level!r}")
    return name


def begin(pool: Pool, conn: PooledConnection, level: str | None) -> None:
    """Start the transaction, at ``level`` if one was asked for (a driver of
    the user's own whose ``begin`` takes no level still works without one)."""
    driver = pool._driver
    assert driver is not None
    if level is not None and not _takes_a_level(type(driver)):
        raise TypeError(
            f"driver {driver!r} cannot set an isolation level: its begin() takes no isolation_level "
            "(see poolkit.drivers.Driver.begin)"
        )
    # The pool's own statement, bounded as its rollback and reset are: a
    # server that stopped answering is cut at ping_timeout (nothing of the
    # work was sent, so run() tries again), not waited for until TCP gives up.
    rec = conn._rec
    assert rec is not None
    with pool._guarded_wait(rec, what=f"its server did not answer BEGIN within ping_timeout ({pool._ping_timeout:g}s)"):
        if level is None:
            driver.begin(conn)
        else:
            driver.begin(conn, level)


_TAKES_A_LEVEL: dict[type, bool] = {}  # driver class -> its begin() takes a level


def _takes_a_level(cls: type) -> bool:
    """Whether ``cls.begin`` takes (self, conn, isolation_level)."""
    found = _TAKES_A_LEVEL.get(cls)
    if found is None:
        try:
            inspect.signature(cls.begin).bind(None, None, None)  # type: ignore[attr-defined]
            found = True
        except TypeError:
            found = False
        except ValueError:  # no signature to read: let the call say
            found = True
        _TAKES_A_LEVEL[cls] = found
    return found


def _is_integrity_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "IntegrityError" for cls in type(exc).__mro__)


#: the shortest a ledger insert waits for another transaction that holds its
#: id: one still running ends in milliseconds
MIN_LEDGER_WAIT = 1.0


def ledger_wait(policy: Retry, started: float) -> float | None:
    """How long an attempt that started its call at ``started`` (monotonic)
    lets its ledger insert wait for another transaction holding the id: until
    the budget's deadline, and at least :data:`MIN_LEDGER_WAIT`. None: no
    deadline, no bound. Without one the wait lasts as long as the server
    keeps that transaction open, hours after a network partition."""
    if math.isinf(policy.deadline):
        return None
    return max(policy.deadline - (time.monotonic() - started), MIN_LEDGER_WAIT)


@contextlib.contextmanager
def bounded_ledger_insert(
    pool: Pool | None, rec: _Conn | None, lock_wait: float | None, request_id: str
) -> Iterator[None]:
    """Around the ledger insert for ``request_id`` on ``rec``, a connection
    of ``pool``: cut it if its server has not answered after ``lock_wait``
    seconds (see ``Pool._guarded_wait``; nothing to cut without a pool, a
    connection or a bound). An insert cut so, or ended by the server's own
    lock timeout, raises ``AmbiguousCommitError`` from the driver's error:
    whether the transaction holding the id commits is unknown."""
    began = time.monotonic()
    guard: contextlib.AbstractContextManager[None] = (
        contextlib.nullcontext()
        if pool is None or rec is None or lock_wait is None
        else pool._guarded_wait(rec, lock_wait, f"request {request_id!r}: no answer to the ledger insert")
    )
    try:
        with guard:
            yield
    except Exception as exc:
        c = pool.classify(exc) if pool is not None else classify(exc)
        if (rec is not None and rec.cut) or c.reason == "lock_timeout":
            raise AmbiguousCommitError(
                f"request {request_id!r}: the ledger insert had no answer after {time.monotonic() - began:.1f}s: "
                "another transaction holds the id (an earlier attempt whose connection was lost, typically, "
                "which the server has not ended yet) or the server does not answer. Whether work under this "
                "id commits is unknown until that transaction ends: ask pool.ledger.committed() later, or "
                "call again with the same id"
            ) from exc
        raise


def run(
    pool: Pool,
    fn: Callable[[PooledConnection], T],
    *,
    idempotent: bool = False,
    retry: Retry | bool | None = None,
    request_id: str | None = None,
    timeout: float | None = None,
    isolation_level: str | enum.Enum | None = None,
) -> T:
    check_work(fn, "pool.run()")
    check_call(idempotent, request_id)
    level = isolation(isolation_level)
    policy = _policy_from(pool.retry, retry)
    ledger = pool.ledger if request_id is not None else None
    state = _Attempt()

    def should_retry(exc: BaseException) -> bool:
        if isinstance(exc, PoolError) and not isinstance(exc, AmbiguousCommitError):
            return False  # PoolTimeout, PoolClosed...: the pool already waited
        c = state.classify(pool, exc)
        state.failed(c.category)
        return safe_to_retry(c.category, state.stage, idempotent=idempotent, request_id=request_id)

    started = time.monotonic()
    retrying = make_retrying(policy, should_retry, lambda rs: _log_retry(pool, policy, state, rs), state)
    for attempt in retrying:
        with attempt:
            number = attempt.retry_state.attempt_number
            # Go's alwaysNewConn: the last attempt, or any after two dead
            # connections, does not trust a pooled connection again.
            fresh = number > 1 and (number == policy.attempts or state.bad_connections >= 2)
            state.stage = "checkout"
            conn = pool._acquire_fresh(timeout) if fresh else pool.acquire(timeout)
            try:
                if ledger is not None:
                    ledger.ensure(conn)
                state.stage = "begin"
                begin(pool, conn, level)
                state.stage = "work"
                if ledger is not None:
                    # The id goes in first, in the work's transaction: if an
                    # earlier attempt or call committed it, this fails at once
                    # (after waiting for one still in flight) and the work never
                    # runs; otherwise the row commits with the work, or not at all.
                    assert request_id is not None
                    # Bounded: after a network partition the server keeps the
                    # lost attempt's transaction, which holds the id, open for
                    # hours. At the deadline the pool cuts this connection (an
                    # insert waiting on a lock has nothing of ours to lose).
                    try:
                        with bounded_ledger_insert(pool, conn._rec, ledger_wait(policy, started), request_id):
                            ledger.record(conn, request_id)
                    except Exception as exc:
                        if not _is_integrity_error(exc):
                            raise
                        conn._end(commit=False)
                        logger.info("pool %r: request %r already committed; not run again", pool.name, request_id)
                        return None  # type: ignore[return-value]
                owned = conn._own("pool.run()")
                try:
                    result = fn(conn)
                finally:
                    conn._disown(owned)
                check_result(result, "pool.run()")
                check_open(conn, "pool.run()")
                state.stage = "commit"
                conn._end(commit=True)
                return result
            except BaseException as exc:
                if not isinstance(exc, AmbiguousCommitError):  # the ledger's, or commit()'s (noticed already)
                    conn._notice(exc, during_commit=state.stage == "commit")
                if state.stage != "commit" and not conn.closed:
                    with contextlib.suppress(Exception):
                        conn._end(commit=False)
                raise
            finally:
                conn.close()
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


@contextlib.contextmanager
def transaction(pool: Pool, timeout: float | None = None, level: str | None = None) -> Iterator[Any]:
    """See ``Pool.transaction``, which checks ``level`` (see :func:`isolation`)."""
    conn = pool.acquire(timeout)
    try:
        begin(pool, conn, level)
        try:
            owned = conn._own("pool.transaction()")
            try:
                yield conn
            finally:
                conn._disown(owned)
        except BaseException as exc:
            conn._notice(exc)
            with contextlib.suppress(Exception):
                conn._end(commit=False)
            raise
        check_open(conn, "pool.transaction()")
        conn._end(commit=True)
    finally:
        conn.close()
