"""The pool: one lock, an idle stack, a FIFO of waiters, generations.

The hot path (an idle connection is there and nobody waits) takes the lock
once to pop a connection and once to push it back; everything that talks to
the server (connect, probe, ping, reset, rollback, close) happens with the
lock released. Functions whose names end in ``_locked`` must be called with
the lock held.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import itertools
import logging
import os
import random
import socket
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from poolkit.classify import Category, Classification, Classifier, classify, remember
from poolkit.drivers import BROKEN, IN_TRANSACTION, Driver, driver_for_connection, liveness_probe
from poolkit.errors import (
    AmbiguousCommitError,
    ConnectionReturned,
    ManagedTransactionError,
    PoolClosed,
    PoolTimeout,
    TooManyWaiters,
)
from poolkit.stats import PoolStats, write_json_atomic

if TYPE_CHECKING:
    from poolkit.retry import Retry

__all__ = ["Pool", "PooledConnection", "PooledCursor"]

logger = logging.getLogger("poolkit.pool")

T = TypeVar("T")
Hook = Callable[[Any], Any]

_INF = float("inf")
# A caller that asks for a connection within this long of returning one "came
# straight back": a loop of short units of work (see Pool._release).
_CAME_BACK = 0.0001
# A returned connection is kept for its caller (see Pool._release) only while
# units of work under contention take less than this on average (a moving
# average over the last few, so the decision follows the workload, not the
# jitter of one): with slower ones there is little to save, and a few reuses
# are a long turn that the waiters' window would cut at random points.
_QUICK = 0.001
# ... and a turn (a connection going back to the same caller) holds at most
# about this much work, at that average: short turns keep the waiters' shares
# even within a fraction of a second, whatever a unit of work costs. (16 ms
# let 0.5 s windows end as uneven as 0.6 least/most served where SELECT 1
# takes 100 us: see the README.)
_TURN = 0.004
# While connects keep failing, the maintenance round tries to keep min_size
# again after a wait that doubles up to this (with jitter): a server that is
# down gets one attempt now and then from each pool, not min_size a second.
_FILL_BACKOFF_MAX = 30.0
# The shortest tick of a pool's clock for the hot path (see Pool._tick_clock):
# a ping_after shorter than four ticks sends more connections to the checks
# than it needs to, rather than waking the maintenance thread more often.
_MIN_TICK = 0.05
_pool_ids = itertools.count(1)
_NUMBER = (int, float)  # the types a timeout may have: checked by type, bool refused
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # left out of leak stacks
_RETURNED = "this connection was returned to its pool and can no longer be used"
_CURSOR_RETURNED = "this cursor's connection was returned to its pool"
# settings whose change ends (or would end) an open transaction: sqlite3
# commits when isolation_level becomes None or autocommit True, MySQL when
# autocommit is switched on
_ENDS_TRANSACTION = frozenset({"autocommit", "isolation_level"})


_OWNED_WHY = (
    "which ends the transaction itself: it commits when the work returns and rolls back when it raises. "
    "(A commit of the work's own would let a retry run the committed part again, or record a request id "
    "with half the work.)"
)


def _owned(where: str, what: str) -> ManagedTransactionError:
    return ManagedTransactionError(f"{what} inside {where}, {_OWNED_WHY} Nothing was sent.")


# Connections a forked child inherited from its parent. The child must never
# use them, and must not let them be garbage collected either: finalising a
# driver connection can send a "goodbye" on the parent's socket.
_INHERITED: list[Any] = []

# The pools whose connections pool.run's work and pool.transaction blocks
# hold, innermost last, each with the thread that holds it: a checkout that
# would wait while its own thread holds every connection of its pool would
# wait for itself. (The thread, because a context copied into another thread,
# as asyncio.to_thread copies it, carries the entries along.)
_HOLDING: contextvars.ContextVar[tuple[_Held, ...]] = contextvars.ContextVar("poolkit_holding", default=())


class _Held:
    """An entry of ``_HOLDING``: a connection of ``pool`` held by ``thread``,
    until :meth:`release`."""

    __slots__ = ("active", "pool", "thread", "token")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.thread = threading.get_ident()
        self.active = True
        held = _HOLDING.get()
        if held:  # drop entries let go of in another context
            held = tuple(h for h in held if h.active)
        self.token = _HOLDING.set((*held, self))

    def release(self) -> None:
        """Let go, in whatever context this runs: a ``pool.transaction()``
        block in a generator may end in another context than it began in
        (FastAPI runs a dependency's enter and exit in two copies of the
        context, in worker threads), where the token cannot reset the
        variable. The entry is marked let go, wherever a context holds it."""
        self.active = False
        with contextlib.suppress(ValueError):  # set in another context
            _HOLDING.reset(self.token)


def _holds_all(pool: Pool, max_size: int) -> bool:
    """Whether this thread's pool.run or pool.transaction frames hold
    ``max_size`` connections of ``pool`` (see ``_HOLDING``)."""
    held = _HOLDING.get()
    if len(held) < max_size:
        return False
    thread = threading.get_ident()
    return sum(1 for h in held if h.pool is pool and h.thread == thread and h.active) >= max_size


def _save(rec: _Conn, key: str, value: Any) -> None:
    """Note in ``rec.saved`` what the return must put back or see to under
    ``key`` (see ``Pool._restore_settings``), and take ``rec`` off the plain
    return path until it has."""
    if rec.saved is None:
        rec.saved = {}
    rec.saved[key] = value
    rec.ticket = None


_NO_TICKET = object()  # nobody's ticket: see Pool._update_return_path_locked
_unset = object()  # a setting the connection did not have before the caller set it
_unknown = object()  # a setting whose value before cannot be read, so cannot be put back
# What these change would stay for the next borrower, and cannot be put back
# as a setting is. sqlite3's install what has no getter to save (an
# authorizer that denies, a progress handler that interrupts, a trace
# callback that sees every statement, a lower limit, a configuration flag,
# extension loading), or replace the database with an in-memory copy
# (deserialize: the next borrower's commits went there, and were lost at
# close). PyMySQL's change the character set of the server's session and of
# the client together (the next borrower read utf8mb4 text as latin1, '?'
# for what it cannot hold, and a read-modify-write stored the '?'). A
# connection a caller changed with one is closed on return, not reused.
_UNRESTORABLE = frozenset(
    {
        "set_authorizer",
        "set_progress_handler",
        "set_trace_callback",
        "setlimit",
        "setconfig",
        "enable_load_extension",
        "load_extension",
        "deserialize",
        "set_character_set",
        "set_charset",
    }
)
# Methods of a driver's connection that may reconnect it in place (see
# Driver.reconnects): refused by the proxy
_RECONNECTING = frozenset({"connect"})
# Methods of a driver's connection or cursor that may commit the open
# transaction first (see Driver.commits_first): refused inside pool.run
_COMMITS_FIRST = frozenset({"begin", "executescript"})

# psycopg's: a handler a caller adds through the proxy is removed on return.
# Left, handlers piled up with every checkout (a leak, each one holding what
# its caller's closure held) and were handed the next borrowers' notices.
_UNDONE_BY = {"add_notice_handler": "remove_notice_handler", "add_notify_handler": "remove_notify_handler"}


def _close_held_cursor(cur: Any) -> None:
    """Close a cursor declared WITH HOLD through the proxy, on return. One
    whose transaction was rolled back is gone from the server already, and
    psycopg's CLOSE of it fails with invalid_cursor_name: nothing to undo."""
    try:
        cur.close()
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != "34000":
            raise


class _Undo:
    """In ``_Conn.saved``: what undoes a call made through the proxy."""

    __slots__ = ("undo",)

    def __init__(self, undo: Callable[[], Any]) -> None:
        self.undo = undo


_ALL_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_ALL_POOLS):
        pool._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Conn:
    """One driver connection and what the pool knows about it."""

    __slots__ = (
        "__weakref__",
        "adopted",
        "bad",
        "checked_out_at",
        "created_at",
        "cut",
        "embedded",
        "epoch",
        "era",
        "expires_at",
        "fd",
        "generation",
        "id",
        "last_used",
        "leak_logged",
        "orphans",
        "owner",
        "owner_in_transaction",
        "pid",
        "poller",
        "pool",
        "raw",
        "retired",
        "saved",
        "stack",
        "streak",
        "ticket",
        "turn_mark",
        "used",
        "waiting_for",
    )

    def __init__(
        self,
        raw: Any,
        cid: int,
        generation: int,
        epoch: int,
        now: float,
        expires_at: float,
        orphans: deque[_Conn] | None = None,
    ) -> None:
        self.raw = raw
        # the pool, while a proxy holds this record (set by _lease, cleared
        # by close): only then, so that the pool and its idle connections
        # make no reference cycle and an abandoned pool is freed at once
        self.pool: Pool | None = None
        # where to go if dropped while checked out: the pool's orphans, by a
        # weak reference. Once the pool is gone, so are they: its idle
        # records die with it, and must not be taken for dropped ones (each
        # copy, resurrecting the connection, was found garbage again by the
        # next collection, and the connection was never closed)
        self.orphans = None if orphans is None else weakref.ref(orphans)
        self.retired = False  # the pool closed it (or let it go) on purpose
        self.id = cid
        self.generation = generation
        self.epoch = epoch
        self.pid = os.getpid()  # the process that opened it (see __del__)
        # the pool's _plain_ticket while this connection may take the plain
        # return path (see PooledConnection.close): the token of the
        # generation it was opened in (set by Pool._open_in_slot); None once
        # it is bad, while a setting the caller changed waits to be restored,
        # or if nobody set it
        self.ticket: object = None
        self.era: object = None  # that token, kept: the ticket again once restored
        # the connection settings a caller changed through the proxy, with
        # their values before (see PooledConnection._set_setting)
        self.saved: dict[str, Any] | None = None
        self.created_at = now
        self.expires_at = expires_at
        # when it was returned (by the clock of the last tick on the plain
        # return: see Pool._tick_clock), or opened or checked
        self.last_used = now
        # the database lives in this process (Driver.embedded): its idle time
        # and lifetime are judged by the clock of the last tick at checkout
        self.embedded = False
        # handed out before, and so due for reset_session at its next checkout
        # (set by _lease: the hot checkout does not hand out connections of a
        # pool that resets them at checkout, which are all due for a look)
        self.used = False
        self.adopted = False  # opened for nobody, and on its way to the idle stack (see Pool._adopt)
        self.bad = ""  # set to a reason when an error showed the connection unusable
        self.poller: Any = None
        # its socket (Driver.cut_fd), for Pool._cut_overdue; None: none to cut
        self.fd: int | None = None
        self.cut = False  # the pool cut it: its server did not answer a rollback, reset or ping
        self.waiting_for = ""  # a guarded wait's reason to be cut, for the log (see Pool._guarded_wait)
        # while pool.run's work or a pool.transaction() block runs on it: the
        # proxy it runs on and who owns the transaction ("pool.run()"), so that
        # the proxy refuses to end it. The proxy, not a flag: if the work
        # returned the connection, a later checkout's proxy is not refused.
        self.owner: tuple[PooledConnection, str] | None = None
        # whether the owner's transaction has been seen open on the server
        # (see PooledConnection._refuse_if_ended)
        self.owner_in_transaction = False
        self.checked_out_at = 0.0
        self.stack: list[traceback.FrameSummary] | None = None
        self.leak_logged = False
        self.streak = 0  # reuses by returning callers while others waited (see Pool._release)
        self.turn_mark = 0.0  # when it was last handed over or kept so (time.monotonic)

    def __del__(self) -> None:
        # A record dies while still open only when the proxy holding it was
        # dropped without being returned (idle ones sit on the stack, and die
        # only with their pool; closed ones are retired). No locks and no I/O
        # here: this can run inside the garbage collector, in any thread. A
        # copy goes to the pool's orphans (a deque: append is atomic) and the
        # pool reclaims it later. Doing this here and not in the proxy keeps a
        # finalizer off every checkout.
        if self.retired:
            return
        try:
            if self.pid != os.getpid():  # inherited by a forked child: never finalised there
                _INHERITED.append(self.raw)
                return
            orphans = None if self.orphans is None else self.orphans()
            if orphans is None:  # the pool is gone (and its idle records with it)
                return
            twin = _Conn(self.raw, self.id, self.generation, self.epoch, self.created_at, self.expires_at)
            twin.orphans = self.orphans
            twin.poller = self.poller
            twin.embedded = self.embedded
            twin.fd = self.fd
            twin.used = self.used
            twin.bad = self.bad
            twin.ticket = self.ticket
            twin.era = self.era
            twin.saved = self.saved
            twin.last_used = self.last_used
            orphans.append(twin)
        except Exception:  # interpreter shutdown
            pass


class _Waiter:
    """A caller waiting for a connection. ``lock`` is held until the pool
    serves the waiter: with a connection (``rec``), with the right to open
    one (``grant``), or with an error."""

    __slots__ = ("error", "grant", "lock", "rec", "since", "young_until")

    def __init__(self, since: float, young_until: float) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.rec: _Conn | None = None
        self.grant = False
        self.error: BaseException | None = None
        self.since = since
        # until then, returning callers may keep reusing connections (see _release)
        self.young_until = young_until


class _Connecting:
    """A connect run for a caller in a thread of its own (see
    :meth:`Pool._open_for_caller`). ``done`` is held until it ends; then
    ``rec`` or ``error`` says how. ``gone``: the caller stopped waiting, and
    what the connect makes is the pool's. Changed under the pool's lock."""

    __slots__ = ("done", "error", "finished", "gone", "rec")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.finished = False
        self.gone = False
        self.rec: _Conn | None = None
        self.error: BaseException | None = None


def _check_number(
    name: str,
    value: Any,
    *,
    minimum: float = 0,
    maximum: float = float("inf"),
    integer: bool = False,
    allow_none: bool = False,
    exclusive: bool = False,
) -> None:
    if value is None and allow_none:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be {kind}{none}, not {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if number != number or (number <= minimum if exclusive else number < minimum):
        op = ">" if exclusive else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}")
    if number > maximum:
        raise ValueError(f"{name} must be at most {maximum:.4g} seconds (what the platform can wait), got {value!r}")


def _bounded(seconds: float) -> float:
    """A wait for a lock or thread: at least 0, and at most what the platform
    can wait (``threading.TIMEOUT_MAX``, some 292 years), so that a timeout
    of ``math.inf`` waits without limit instead of raising OverflowError."""
    return min(max(0.0, seconds), threading.TIMEOUT_MAX)


def _check_hook(name: str, value: Any, *, allow_bool: bool) -> None:
    if value is None or (allow_bool and isinstance(value, bool)) or callable(value):
        return
    also = "True/False, " if allow_bool else ""
    raise TypeError(f"{name} must be {also}None or a callable, not {type(value).__name__}")


class Pool:
    """A pool of DB-API connections.

    ``connect`` is a zero-argument callable that returns a new DB-API
    connection, e.g. ``functools.partial(psycopg.connect, dsn)``. Every
    option is keyword-only and checked here; see the README for what each
    does and why its default is what it is.
    """

    # Slots, not a __dict__: CPython 3.11 keeps the attributes of an instance
    # in its fast, shared-key layout only while there are fewer than 30, and
    # a pool has twice that, so every attribute read on the hot path was a
    # dict lookup, twice as slow (7% of a checkout + checkin, counted in
    # instructions with callgrind). 3.13 has no such limit.
    __slots__ = (
        "__weakref__",
        "_acquired",
        "_classifier",
        "_clock",
        "_closed",
        "_closed_by",
        "_closed_total",
        "_closing",
        "_configure",
        "_connect",
        "_connect_errors",
        "_connecting",
        "_connects_abandoned",
        "_created",
        "_cuts",
        "_driver",
        "_driver_checked",
        "_epoch",
        "_era",
        "_fill_after",
        "_fill_failures",
        "_fresh_after",
        "_generation",
        "_guarded",
        "_handoff_after",
        "_handoff_streak",
        "_hold_avg",
        "_idle",
        "_ids",
        "_is_valid",
        "_last_connect_error",
        "_leak_timeout",
        "_lifetime_jitter",
        "_liveness",
        "_lock",
        "_looping",
        "_maintainer",
        "_maintenance_interval",
        "_max_idle",
        "_max_idle_option",
        "_max_idle_time",
        "_max_lifetime",
        "_max_size",
        "_max_waiting",
        "_min_size",
        "_now",
        "_now_ahead",
        "_open",
        "_opening",
        "_orphans",
        "_out",
        "_ping_after",
        "_ping_failures",
        "_ping_hook",
        "_ping_timeout",
        "_pings",
        "_plain_ticket",
        "_random",
        "_recheck_after",
        "_reset_hook",
        "_reset_on_return",
        "_retries",
        "_returned",
        "_returned_at",
        "_stop",
        "_tick",
        "_timeout",
        "_timeouts",
        "_wait_count",
        "_wait_time",
        "_waiters",
        "_wake",
        "_wake_at",
        "ledger",
        "name",
        "retry",
    )

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        max_size: int = 10,
        min_size: int = 0,
        max_idle: int | None = None,
        max_lifetime: float | None = 3600.0,
        lifetime_jitter: float = 0.1,
        max_idle_time: float | None = 600.0,
        timeout: float = 30.0,
        max_waiting: int = 0,
        liveness: bool = True,
        ping: bool | Hook | None = True,
        ping_after: float = 30.0,
        ping_timeout: float = 5.0,
        reset_session: bool | Hook | None = False,
        reset_on: Literal["checkout", "return"] = "checkout",
        is_valid: Hook | None = None,
        configure: Hook | None = None,
        name: str | None = None,
        classifier: Classifier | None = None,
        retry: Retry | bool | None = None,
        leak_timeout: float | None = None,
        ledger_table: str = "poolkit_requests",
        driver: Driver | None = None,
        maintenance_interval: float = 1.0,
        handoff_after: float = 0.05,
        handoff_streak: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(connect):
            raise TypeError(f"connect must be a zero-argument callable, not {type(connect).__name__}")
        _check_number("max_size", max_size, minimum=1, integer=True)
        _check_number("min_size", min_size, integer=True)
        if min_size > max_size:
            raise ValueError(f"min_size ({min_size}) must not exceed max_size ({max_size})")
        _check_number("max_idle", max_idle, integer=True, allow_none=True)
        _check_number("max_lifetime", max_lifetime, exclusive=True, allow_none=True)
        _check_number("lifetime_jitter", lifetime_jitter)
        if lifetime_jitter >= 1:
            raise ValueError(f"lifetime_jitter is a fraction of max_lifetime, must be < 1, got {lifetime_jitter!r}")
        _check_number("max_idle_time", max_idle_time, exclusive=True, allow_none=True)
        _check_number("timeout", timeout)
        _check_number("max_waiting", max_waiting, integer=True)
        _check_number("ping_after", ping_after)
        _check_number("ping_timeout", ping_timeout, exclusive=True, maximum=threading.TIMEOUT_MAX)
        _check_number("leak_timeout", leak_timeout, exclusive=True, allow_none=True)
        _check_number("maintenance_interval", maintenance_interval, exclusive=True, maximum=threading.TIMEOUT_MAX)
        _check_number("handoff_after", handoff_after)
        _check_number("handoff_streak", handoff_streak, integer=True)
        _check_hook("ping", ping, allow_bool=True)
        _check_hook("reset_session", reset_session, allow_bool=True)
        if reset_on not in ("checkout", "return"):
            raise ValueError(f"reset_on must be 'checkout' or 'return', not {reset_on!r}")
        _check_hook("is_valid", is_valid, allow_bool=False)
        _check_hook("configure", configure, allow_bool=False)
        _check_hook("classifier", classifier, allow_bool=False)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if driver is not None and not isinstance(driver, Driver):
            raise TypeError(f"driver must be a poolkit.drivers.Driver, not {type(driver).__name__}")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        if not isinstance(liveness, bool):
            raise TypeError(f"liveness must be True or False, not {type(liveness).__name__}")

        self.name = name if name is not None else f"pool-{next(_pool_ids)}"
        self._connect = connect
        self._min_size = min_size
        self._max_idle_option = max_idle  # None: follow max_size, through resize() too
        self._max_idle = max_size if max_idle is None else min(max_idle, max_size)
        self._max_lifetime = _INF if max_lifetime is None else float(max_lifetime)
        self._lifetime_jitter = float(lifetime_jitter)
        self._max_idle_time = _INF if max_idle_time is None else float(max_idle_time)
        self._timeout = float(timeout)
        self._max_waiting = max_waiting
        self._liveness = liveness
        self._ping_hook = ping
        self._ping_after = float(ping_after)
        self._ping_timeout = float(ping_timeout)
        self._reset_hook = reset_session
        # reset a used connection when it comes back rather than before its
        # next use: what the session held (a lock) goes with the caller
        self._reset_on_return = bool(reset_session) and reset_on == "return"
        self._is_valid = is_valid
        self._configure = configure
        self._classifier = classifier
        self._leak_timeout = leak_timeout
        self._driver: Driver | None = driver
        self._driver_checked = False
        # How long after its last use a connection needs a look before reuse
        # (see _tick_clock): -inf, always, when every checkout runs a hook
        # (reset_session, leak tracking) or pings (ping_after=0), whatever
        # the tick.
        self._recheck_after = min(self._max_idle_time, self._ping_after) if ping else self._max_idle_time
        if (reset_session and not self._reset_on_return) or leak_timeout is not None or self._recheck_after <= 0:
            self._recheck_after = -_INF
        self._maintenance_interval = float(maintenance_interval)
        # The return reads no clock, nor does the checkout of an embedded
        # database's connection (two reads were a sixth of a checkout and
        # checkin): they use the clock as the maintenance thread last read it,
        # at most a tick ago (_now), the checkout against deadlines set a tick
        # early, so that a connection due for a look never passes for fresh.
        # The checks themselves read the clock (see _tick_clock).
        r = self._recheck_after
        self._tick = self._maintenance_interval
        if 0 < r < _INF:
            self._tick = min(self._tick, max(_MIN_TICK, r / 4))
        self._handoff_after = float(handoff_after)
        self._handoff_streak = handoff_streak
        self._clock = clock
        self._random = random.Random()
        self._ids = itertools.count(1)
        self.retry = self._resolve_retry(retry)
        from poolkit.retry import Ledger

        self.ledger = Ledger(ledger_table)

        # The lock protects everything below, up to the next blank line, and
        # every counter. Nothing under it does I/O.
        self._lock = threading.Lock()
        self._max_size = max_size
        self._idle: list[_Conn] = []  # LIFO: hot connections on top
        # checked out, for the leak log; weak, so a dropped proxy's connection can still be reclaimed
        self._out: weakref.WeakSet[_Conn] | None = weakref.WeakSet() if leak_timeout is not None else None
        self._waiters: deque[_Waiter] = deque()  # FIFO
        self._connecting: set[_Connecting] = set()  # callers waiting for a connect of their own
        # connections whose server the pool waits for (a rollback, a reset, a ping), and until when
        self._guarded: dict[_Conn, float] = {}
        # do callers come straight back after returning a connection? (see _release)
        self._returned_at = -_INF  # the last return seen while others waited
        self._looping = False
        self._hold_avg = 0.0  # moving average of units of work under contention
        self._open = 0  # connections open or being opened: never above max_size
        self._opening = 0
        # let go of (off the idle stack, or returned), and not closed yet.
        # Connections checked out are not counted: they are what is left of
        # _open, so the hot path moves one between the idle stack and its
        # caller without touching a counter (see _in_use_locked)
        self._closing = 0
        self._generation = 0
        self._era = object()  # a new token with each generation: see _plain_ticket
        self._epoch = 0  # bumped in a forked child
        self._fill_failures = 0  # maintenance rounds in a row that could not keep min_size
        self._fill_after = -_INF  # no such round before then (the pool's clock)
        self._closed = False
        self._plain_ticket: object = None  # see _update_return_path_locked
        self._last_connect_error: BaseException | None = None
        self._returned = threading.Condition(self._lock)  # close() waits on it
        self._zero_counters_locked()
        self._update_return_path_locked()

        self._orphans: deque[_Conn] = deque()  # dropped proxies; appended without the lock
        self._stop = threading.Event()
        # The maintenance thread sleeps on _wake until _wake_at (on the pool's
        # clock; inf while it works out when): a guarded wait due before then
        # wakes it (see _guarded_wait), so its cut is not an interval late.
        self._wake = threading.Event()
        self._wake_at = _INF
        self._maintainer: threading.Thread | None = None
        _ALL_POOLS.add(self)
        self._start_maintenance()

    # ------------------------------------------------------------------ setup

    def _resolve_retry(self, retry: Retry | bool | None) -> Retry:
        from poolkit.retry import Retry

        if retry is None or retry is True:
            return Retry.default()
        if retry is False:
            return Retry.off()
        if isinstance(retry, Retry):
            return retry
        raise TypeError(f"retry must be a poolkit.Retry, True, False or None, not {type(retry).__name__}")

    def _update_return_path_locked(self) -> None:
        """May a returned connection go straight back on the idle stack, once
        nobody waits? Only with no ``is_valid`` hook to run, and not when the
        pool is closed, tracks leaks, or has more connections than it may keep
        (it was shrunk, or keeps fewer idle than ``max_size``). Called
        whenever one of these changes, and with each new generation.

        The answer is the plain ticket: what a connection's ticket must be
        for the plain return path, all its conditions in one identity test.
        It is the current generation's token (so a connection opened in an
        older one, or inherited across a fork, which starts a generation too,
        does not match; nor does a bad one, or one with a setting to put
        back, whose ticket is None), or
        _NO_TICKET, which matches nobody."""
        simple = (
            self._is_valid is None
            and not self._reset_on_return
            and not self._closed
            and self._out is None
            and self._open <= self._max_size
            and self._max_idle >= self._max_size
        )
        self._plain_ticket = self._era if simple else _NO_TICKET

    def _new_generation_locked(self) -> None:
        """Retire, in effect, every connection that exists now (see invalidate())."""
        self._generation += 1
        self._era = object()
        self._update_return_path_locked()  # a new plain ticket

    def _zero_counters_locked(self) -> None:
        self._acquired = 0.0  # a count: see acquire()
        self._wait_count = 0
        self._wait_time = 0.0
        self._timeouts = 0
        self._created = 0
        self._closed_total = 0
        self._closed_by: dict[str, int] = dict.fromkeys(("bad", "expired", "idle", "invalidated", "invalid"), 0)
        self._pings = 0
        self._ping_failures = 0
        self._retries = 0
        self._connect_errors = 0
        self._connects_abandoned = 0
        self._cuts = 0

    def _tick_clock(self) -> float:
        """Read the pool's clock for the hot path; returns it.

        The maintenance thread calls this every tick (``maintenance_interval``,
        or a quarter of ``ping_after`` or ``max_idle_time`` if shorter, but not
        under 0.05 s), so ``_now`` lags the clock by a tick at most. The plain
        return notes ``_now`` as the connection's last use: up to a tick
        early, so its idle time may come out that much longer (a ping a
        little early, never one skipped). The hot checkout of a connection to
        a server reads the clock itself: a process paused (a frozen
        container) cannot tick, and a connection idle through the pause must
        be pinged at the first checkout after it. That of an embedded
        database (``Driver.embedded``: sqlite3), which nothing can cut while
        idle, reads none: it hands a connection out unchecked only if it was
        last used after ``_fresh_after`` (``_now`` less the time a connection
        may stay idle unchecked, plus a tick) and ``_now_ahead`` (``_now``
        plus a tick) is short of its expiry. So one idle for ``ping_after``
        (or past its lifetime) still goes to the checks, which read the clock
        and decide, unless the thread fell behind: then they come late by as
        much."""
        now = self._clock()
        self._now = now
        self._fresh_after = now - self._recheck_after + self._tick
        self._now_ahead = now + self._tick
        return now

    def _start_maintenance(self) -> None:
        from poolkit._maintenance import start_maintenance

        self._tick_clock()  # the first reading (and, in a forked child, a fresh one)
        self._maintainer = start_maintenance(self)

    # --------------------------------------------------------------- checkout

    def connection(self, timeout: float | None = None) -> PooledConnection:
        """A connection for a ``with`` block: ``with pool.connection() as conn:``.
        Leaving the block returns it (an open transaction is rolled back)."""
        return self.acquire(timeout)

    def acquire(self, timeout: float | None = None) -> PooledConnection:
        """Check out a connection; return it with ``conn.close()``.

        Waits at most ``timeout`` seconds (the pool's ``timeout`` if None),
        then raises :class:`PoolTimeout`.
        """
        if timeout is not None and not (type(timeout) in _NUMBER and timeout >= 0):
            _check_number("timeout", timeout)  # raises, naming the problem
        # The hot path takes the lock by hand, released in a finally: a
        # `with` block costs 0.15 us here, acquire() and release() 0.07 us.
        lock = self._lock
        lock.acquire()
        try:
            # Under the lock, the idle stack is empty once the pool is closed
            # and holds only connections of the current generation: close(),
            # invalidate() and _release() see to it. No need to check either.
            idle = self._idle
            if idle and (not self._waiters or self._may_barge_locked()):
                rec = idle.pop()
                # a float, which 3.11 adds through a free list where it makes a
                # new int past 256 through the allocator (75 instructions a
                # checkout); exact up to 2**53 checkouts (stats() gives an int)
                self._acquired += 1.0
            else:
                rec = None
        finally:
            lock.release()
        if rec is not None:
            # the hot path: a fresh connection whose socket is quiet
            if rec.embedded:
                # Nothing can cut it while idle: fresh by the clock of the
                # last tick (see _tick_clock).
                if rec.last_used <= self._fresh_after or self._now_ahead >= rec.expires_at:
                    return self._acquire_checked(rec, None, timeout)
            else:
                # A connection to a server: fresh by the clock itself, so that
                # one idle through a pause of the process (a frozen container,
                # before the maintenance thread has ticked) is pinged at once.
                # Its last use is the return's tick, up to a tick early: a ping
                # may come that much early, never late. Called through a
                # local: on 3.11 a method call on a slot is never specialised.
                clock = self._clock
                now = clock()
                if now - rec.last_used >= self._recheck_after or now >= rec.expires_at:
                    return self._acquire_checked(rec, None, timeout)
            poller = rec.poller
            if poller is None or not poller.poll(0, 1):  # a non-empty list if suspect
                proxy = PooledConnection()  # _lease(self, rec), inlined
                proxy._pool = rec.pool = self
                proxy._rec = rec
                return proxy
            return self._acquire_checked(rec, True, timeout)
        return self._acquire_loop(time.monotonic() + (self._timeout if timeout is None else timeout))

    def _acquire_checked(self, rec: _Conn, suspect: bool | None, timeout: float | None) -> PooledConnection:
        """The hot path took ``rec``, due for a look (``suspect``: what its
        probe said, None if not probed yet): check it, or take another. (Out
        of acquire(), whose frame each local makes dearer on the hot path.)"""
        start = time.monotonic()  # the checks may take a while (a ping)
        reason = self._check_out(rec, suspect)
        if reason is None:
            return _lease(self, rec)
        self._discard(rec, reason)
        return self._acquire_loop(start + (self._timeout if timeout is None else timeout), reason)

    def _acquire_loop(self, deadline: float, reason: str | None = None) -> PooledConnection:
        """Checkout past the hot path, until ``deadline``. A connection the
        pool opens for this caller is handed out as it is: it has just
        talked to the server, so a ping (with ``ping_after=0``) would only
        repeat that, and a ping that fails every time would discard and
        reopen connections for ever. A pooled one is checked, and one that
        fails its checks is discarded; then the caller tries again. Once the
        checks have taken it past its deadline (a slow ping, say), it checks
        no more: it opens a new connection in a free slot (the one just
        discarded left one, unless a waiter took it), or gives up.
        ``reason``: why the hot path discarded one."""
        discarded = 0 if reason is None else 1
        while True:
            late = bool(discarded) and time.monotonic() >= deadline
            rec, fresh = self._acquire_slow(deadline, fresh_only=late)
            if rec is None and not fresh:  # late, and no free slot
                with self._lock:
                    self._timeouts += 1
                raise PoolTimeout(
                    f"pool {self.name!r}: no usable connection before the timeout "
                    f"({discarded} discarded at checkout, the last as {reason!r})"
                )
            if rec is not None:
                if fresh:
                    if self._out is not None:
                        self._track_lease(rec, self._clock())
                    return _lease(self, rec)
                reason = self._check_out(rec)
                if reason is None:
                    return _lease(self, rec)
                self._discard(rec, reason)
                discarded += 1
            # else: opened across an invalidate(), and closed already; the
            # next round opens another or waits, with the deadline

    def _in_use_locked(self) -> int:
        """Connections checked out: open, and neither being opened, idle, nor
        let go of and being closed. Derived, not counted, so that a checkout
        and a checkin on the hot path change no counter but ``acquired``."""
        return self._open - self._opening - self._closing - len(self._idle)

    def _acquire_slow(self, deadline: float, fresh_only: bool = False) -> tuple[_Conn | None, bool]:
        """No idle connection was free: open one, or wait in line. Returns a
        connection (None if the one opened was discarded already) and whether
        it was opened for this call (and so needs no checks). ``fresh_only``:
        only open one, in a free slot, or return (None, False)."""
        if self._orphans:
            self._reclaim_orphans()
        if self._maintainer is None:
            self._start_maintenance()  # in a forked child (_reset_after_fork cleared it)
        waiter = None
        try:
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if not fresh_only and self._idle and (not self._waiters or self._may_barge_locked()):
                    rec = self._idle.pop()
                    self._acquired += 1
                    return rec, False
                if self._open < self._max_size:
                    self._open += 1
                    self._opening += 1
                elif fresh_only:
                    return None, False
                else:
                    if self._max_waiting and len(self._waiters) >= self._max_waiting:
                        raise TooManyWaiters(
                            f"pool {self.name!r}: {len(self._waiters)} callers already waiting (max_waiting)"
                        )
                    if _holds_all(self, self._max_size):
                        self._timeouts += 1
                        raise PoolTimeout(
                            f"pool {self.name!r}: this thread's pool.run or pool.transaction holds every one "
                            f"of its connections (max_size={self._max_size}), so none can come back while it waits: "
                            "a run or checkout nested in another would wait for itself until the timeout "
                            "(pass the connection down, or raise max_size)"
                        )
                    now = time.monotonic()
                    self._looping = now - self._returned_at < _CAME_BACK
                    waiter = _Waiter(now, now + self._handoff_after)
                    self._waiters.append(waiter)
            if waiter is not None:
                waiter_rec = self._wait(waiter, deadline)
                if waiter_rec is not None:
                    return waiter_rec, False
                # granted a slot: open a connection in it
        except BaseException:
            if waiter is not None:
                self._abandon(waiter)
            raise
        return self._open_for_caller(deadline, late=fresh_only), True

    def _abandon(self, waiter: _Waiter) -> None:
        """``waiter``'s caller left by an exception: a timeout or the pool's
        closing (nothing to undo then), or an interruption while it waited
        (KeyboardInterrupt, a gevent Timeout). Take it out of the line, and
        pass on what the pool gave it meanwhile: a connection to the next
        waiter or the idle stack, a slot to the next waiter. Left in line, it
        would be handed connections and slots that nobody takes."""
        with self._lock:
            with contextlib.suppress(ValueError):  # not in line: served, timed out, or the pool closed
                self._waiters.remove(waiter)
            rec, waiter.rec = waiter.rec, None
            if waiter.grant:
                waiter.grant = False
                self._release_slot_locked()
            reason = None if rec is None else self._put_back_locked(rec, None)
            self._serve_idle_locked()  # not kept for this caller: it is gone
        if rec is not None and reason is not None:
            self._log_discard(rec, reason)
            self._retire(rec, reason)

    def _may_barge_locked(self) -> bool:
        """Others wait, and a connection is idle: may this caller take it? Yes
        while the oldest waiter is within its ``handoff_after`` window (the
        connection was returned to idle for a caller that comes straight
        back; see :meth:`_release`)."""
        now = time.monotonic()
        self._looping = now - self._returned_at < _CAME_BACK
        return now < self._waiters[0].young_until

    def _serve_idle_locked(self) -> None:
        """Hand idle connections to the waiters, oldest first."""
        if not (self._idle and self._waiters):
            return
        now = time.monotonic()
        while self._idle and self._waiters:
            waiter = self._waiters.popleft()
            rec = self._idle.pop()
            rec.streak = 0
            rec.turn_mark = now
            waiter.rec = rec
            waiter.lock.release()

    def _wait(self, waiter: _Waiter, deadline: float) -> _Conn | None:
        """Wait until served; returns a connection, or None for a granted slot.

        A waiter wakes once by itself at the end of its ``handoff_after``
        window: connections returned meanwhile may have gone to the idle
        stack for their returning threads to reuse, and it takes one of those
        now (serving any older waiter first). From then on it is "old":
        every returned connection goes straight to the oldest waiter."""
        start = waiter.since
        early = start < waiter.young_until < deadline
        served = waiter.lock.acquire(timeout=_bounded((waiter.young_until if early else deadline) - time.monotonic()))
        if not served and early:
            with self._lock:
                waiter.young_until = 0.0  # old now, whatever the timer's rounding
                if waiter.rec is None and not waiter.grant and waiter.error is None:
                    self._serve_idle_locked()  # connections left idle while we were young
            waiter.lock.acquire(timeout=_bounded(deadline - time.monotonic()))
        with self._lock:
            self._wait_count += 1
            self._wait_time += time.monotonic() - start
            if waiter.error is not None:
                raise waiter.error
            if waiter.rec is None and not waiter.grant:
                self._serve_idle_locked()  # time is up, but there may be a connection
            rec, waiter.rec = waiter.rec, None  # ours now: nothing for _abandon to pass on
            if rec is not None:
                self._acquired += 1  # counted in use already
                return rec
            if waiter.grant:
                waiter.grant = False  # ours now: _open_in_slot gives it back if it fails
                return None
            # timed out, and nobody served us in the meantime: leave the line
            self._waiters.remove(waiter)
            self._timeouts += 1
            cause = self._last_connect_error if self._opening else None
            waiting = len(self._waiters)
        raise PoolTimeout(
            f"pool {self.name!r}: no connection within {deadline - start:.3g}s "
            f"({self._max_size} in use, {waiting} others waiting)"
        ) from cause

    def _open_for_caller(self, deadline: float, late: bool = False) -> _Conn | None:
        """:meth:`_open_in_slot` for a caller who waits no longer than its
        ``deadline``. A connect can hang where Python cannot interrupt it: a
        server (or a proxy before it) that accepted the TCP connection and
        never answers, a SYN lost to a dead host, which Linux retries for two
        minutes. So, unless the driver says its connects cannot hang
        (``Driver.connect_can_hang``; an embedded database's) or the caller
        waits without limit, the connect runs in a thread of its own, and
        the caller stops waiting for it at its deadline (PoolTimeout). The
        connect goes on: the connection it makes joins the pool (the next
        waiter, or the idle stack), and one that fails gives its slot back.
        ``late``: the caller's checks took it past its deadline already (see
        :meth:`_acquire_loop`); it waits for this one connect at most
        ``ping_timeout``, the bound of the check it replaces."""
        driver = self._driver
        if deadline == _INF or (driver is not None and not driver.connect_can_hang):
            try:
                return self._open_in_slot(deadline)
            except PoolTimeout:
                self._count_timeout()
                raise
        until = time.monotonic() + self._ping_timeout if late else deadline
        job = _Connecting()
        with self._lock:
            self._connecting.add(job)  # close() wakes the caller
        thread = threading.Thread(
            target=self._connect_for, args=(job, deadline), name=f"poolkit-connect-{self.name}", daemon=True
        )
        try:
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: nobody connects in the slot
                with self._lock:
                    job.finished = True  # ended before it began: nothing was abandoned
                    self._release_slot_locked()
                raise
            job.done.acquire(timeout=_bounded(until - time.monotonic()))
        except BaseException:  # interrupted while it waits (KeyboardInterrupt), or no thread
            if not self._leave(job, timed_out=False) and job.rec is not None:
                self._adopt(job.rec)  # it came as the caller left
            raise
        if self._leave(job, timed_out=True):
            raise PoolTimeout(
                f"pool {self.name!r}: could not connect within the timeout: the connect has not returned "
                "(it goes on, and the connection it makes joins the pool; give the driver a connect_timeout)"
            ) from self._last_connect_error
        if job.error is not None:
            if isinstance(job.error, PoolTimeout):  # the connect gave up at the deadline
                self._count_timeout()
            raise job.error
        return job.rec

    def _count_timeout(self) -> None:
        """A caller gets PoolTimeout: its connects failed until its deadline
        (a server that refuses them, say), which ``stats().timeouts`` counts
        as it counts a wait for a connection that ran out."""
        with self._lock:
            self._timeouts += 1

    def _leave(self, job: _Connecting, *, timed_out: bool) -> bool:
        """The caller stops waiting for ``job``. True if the connect has not
        ended: what it makes is the pool's from now on."""
        with self._lock:
            self._connecting.discard(job)
            if job.finished:
                return False
            job.gone = True
            self._connects_abandoned += 1
            if timed_out:
                self._timeouts += 1
            return True

    def _connect_for(self, job: _Connecting, deadline: float) -> None:
        """The thread of :meth:`_open_for_caller`: open a connection in the
        caller's slot, and hand it over; to the pool, if the caller left."""
        rec: _Conn | None = None
        error: BaseException | None = None
        try:
            rec = self._open_in_slot(deadline)  # gives the slot back if it fails
        except BaseException as exc:
            error = exc
        with self._lock:
            if not job.gone:
                job.rec, job.error, job.finished = rec, error, True
                job.done.release()
                return
        if rec is not None:
            logger.info("pool %r: connection %d opened after its caller stopped waiting: kept", self.name, rec.id)
            self._adopt(rec)

    def _adopt(self, rec: _Conn) -> None:
        """A connection opened for nobody (``min_size``; a caller who stopped
        waiting): to the next waiter, or the idle stack."""
        with self._lock:
            self._acquired -= 1  # _open_in_slot counted a checkout; nobody checked it out
        rec.adopted = self._reset_on_return  # no session to reset: nobody used it
        self._release(rec)

    def _open_in_slot(self, deadline: float, quiet: bool = False) -> _Conn | None:
        """Open a connection in a slot reserved for this caller, retrying with
        backoff while the server does not answer, until ``deadline``.

        Whatever stops it (a connect error, the deadline, or an exception
        that is not an error at all: KeyboardInterrupt, a gevent Timeout
        raised inside a hung connect) gives the slot back before it goes
        on: a slot lost here would be lost to the pool for good. ``quiet``:
        log connect failures at DEBUG, not WARNING."""
        generation = self._generation  # read before connecting: see invalidate()
        era = self._era
        epoch = self._epoch
        raw = rec = None
        try:
            raw = self._connect_until(deadline, quiet)  # closes what it opened if it fails
            now = self._clock()
            lifetime = self._max_lifetime * (1.0 - self._lifetime_jitter * self._random.random())
            rec = _Conn(raw, next(self._ids), generation, epoch, now, now + lifetime, self._orphans)
            rec.ticket = rec.era = era
            rec.embedded = self._driver.embedded(raw)  # type: ignore[union-attr]
            if self._liveness:
                rec.poller = liveness_probe(self._driver, raw)  # type: ignore[arg-type]
            rec.fd = self._driver.cut_fd(raw)  # type: ignore[union-attr]
        except BaseException:
            if rec is not None:
                rec.retired = True  # not an orphan: closed here
                if rec.poller is not None:
                    rec.poller.close()
            if raw is not None:
                self._close_raw(raw)
            with self._lock:
                self._release_slot_locked()
            raise
        with self._lock:
            self._opening -= 1
            self._created += 1
            self._last_connect_error = None
            self._fill_failures = 0  # the server answers: keep min_size again at once
            self._fill_after = -_INF
            stale = generation != self._generation or self._closed or epoch != self._epoch
            if not stale:
                self._acquired += 1
                return rec
            self._closing += 1
        self._retire(rec, "invalidated")  # opened before an invalidate(): never handed out
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        return None

    def _check_configured(self, raw: Any, by: str = "configure") -> None:
        """``configure`` (or ``connect``, ``by``) must leave no transaction
        open (psycopg opens one at its first statement, a SET too): the first
        rollback on return would undo what it set, for every later borrower.
        As psycopg_pool does, the connection is refused, with the fix named."""
        state = self._driver.transaction_state(raw)  # type: ignore[union-attr]
        if state == IN_TRANSACTION and self._driver.keeps_transaction_open(raw):  # type: ignore[union-attr]
            return  # the one a commit in configure began: nothing of configure's is in it
        if state in (IN_TRANSACTION, BROKEN):
            left = "in a transaction" if state == IN_TRANSACTION else "broken"
            raise ValueError(
                f"pool {self.name!r}: {by} left the new connection {left}: what it set would be undone "
                "by the first rollback on return; end the transaction "
                + (
                    "in configure (conn.commit())"
                    if by == "configure"
                    else "there (commit it), or set the session up in the pool's configure hook"
                )
            )

    def _log_advice(self, raw: Any) -> None:
        """Log what the driver says about how its first connection was
        opened (see ``Driver.advice``), and that ``reset_session=True``
        will do nothing if the driver has no reset: once per pool, and never
        in the way of the connect."""
        try:
            advice = self._driver.advice(raw)  # type: ignore[union-attr]
        except Exception:
            logger.debug("pool %r: the driver's advice failed", self.name, exc_info=True)
            return
        if advice is not None:
            logger.warning("pool %r: %s", self.name, advice)
        try:
            resets = self._reset_hook is not True or self._driver.resets_session(raw)  # type: ignore[union-attr]
        except Exception:
            return
        if not resets:
            logger.warning(
                "pool %r: reset_session=True, but the %s driver has no session reset: nothing is reset "
                "(what a borrower set in SQL stays for the next); pass a reset_session callable that does it",
                self.name,
                self._driver.name,  # type: ignore[union-attr]
            )

    def _connect_until(self, deadline: float, quiet: bool = False) -> Any:
        """A new, configured driver connection, retried with backoff while
        the server does not answer; ``PoolTimeout`` at ``deadline``. The
        caller owns the slot (see :meth:`_open_in_slot`)."""
        attempt = 0
        while True:
            raw = None
            try:
                raw = self._connect()
                if raw is None:
                    raise TypeError(
                        f"pool {self.name!r}: connect returned None, not a DB-API connection "
                        "(does it return the connection it opens?)"
                    )
                if self._driver is None:
                    self._driver = driver_for_connection(raw)
                if not self._driver_checked:
                    self._driver.check_interface(raw)
                self._driver.open(raw)
                if not self._driver_checked:
                    self._driver.check_config(raw)
                    self._driver_checked = True
                    self._log_advice(raw)
                # what a connect callable set (a SET after psycopg.connect())
                # would be lost as configure's would
                self._check_configured(raw, by=self._driver.connect_is)
                if self._configure is not None:
                    self._configure(raw)
                    self._check_configured(raw)
                return raw
            except Exception as exc:
                if raw is not None:
                    self._close_raw(raw)
                retry = _is_connect_failure(exc) and not self._closed
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + self._random.random() / 2)
                attempt += 1
                with self._lock:
                    self._connect_errors += 1
                    self._last_connect_error = exc
                logger.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "pool %r: connect failed (attempt %d): %r",
                    self.name,
                    attempt,
                    exc,
                )
                if not retry:
                    raise
                if time.monotonic() + delay >= deadline:
                    raise PoolTimeout(f"pool {self.name!r}: could not connect within the timeout: {exc}") from exc
            except BaseException:  # interrupted in the connect or the set-up
                if raw is not None:
                    self._close_raw(raw)
                raise
            self._stop.wait(delay)

    def _acquire_fresh(self, timeout: float | None) -> PooledConnection:
        """A connection opened for this caller, never a pooled one: in a free
        slot, or in the slot of the oldest idle connection, which is closed.
        When every connection is checked out, falls back to :meth:`acquire`."""
        if timeout is not None:
            _check_number("timeout", timeout)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        victim = None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            if self._waiters or (self._open >= self._max_size and not self._idle):
                slot = False
            else:
                slot = True
                if self._open >= self._max_size:
                    victim = self._idle.pop(0)  # oldest; its slot becomes ours
                else:
                    self._open += 1
                self._opening += 1
        if not slot:
            return self.acquire(timeout)
        if victim is not None:
            try:
                self._retire(victim, "refreshed", keep_slot=True)
            except BaseException:  # interrupted in the close: give back the slot we took
                with self._lock:
                    self._release_slot_locked()
                raise
        rec = self._open_for_caller(deadline)
        if rec is not None:
            if self._out is not None:
                self._track_lease(rec, self._clock())
            return _lease(self, rec)
        return self.acquire(max(0.0, deadline - time.monotonic()))

    def _check_out(self, rec: _Conn, suspect: bool | None = None) -> str | None:
        """Checks before handing ``rec`` out; the reason to discard it, or None.
        ``suspect``: what the liveness probe said already (None: not run yet).

        If a check raises instead (KeyboardInterrupt or a gevent Timeout in
        the middle of a ping, or a hook's bug), ``rec`` is discarded before
        the exception goes on: a connection interrupted mid-conversation
        cannot be trusted, and it must not be stranded, counted as in use."""
        now = self._clock()
        if rec.generation != self._generation:
            return "invalidated"
        if now >= rec.expires_at:
            return "expired"
        if now - rec.last_used > self._max_idle_time:
            return "idle"
        try:
            if suspect is None:
                suspect = rec.poller is not None and bool(rec.poller.poll(0, 1))
            if suspect or (self._ping_hook and now - rec.last_used >= self._ping_after):
                if not self._ping_hook:
                    return "bad"  # readable or hung up while idle, and no ping to ask
                if not self._ping(rec):
                    return "bad"
            if rec.used and self._reset_hook and not self._reset_on_return:
                with self._guarded_wait(rec):
                    reset = self._reset_session(rec)
                if rec.cut:
                    return "bad"
                if not reset:
                    return "invalid"
            if rec.generation != self._generation:  # invalidated while we pinged
                return "invalidated"
            if self._out is not None:
                self._track_lease(rec, now)
        except BaseException:
            self._discard(rec, "bad")
            raise
        return None

    def _reset_session(self, rec: _Conn) -> bool:
        """Run ``reset_session`` on ``rec`` (inside a guarded wait of the
        caller's); False if it failed or said no."""
        raw = rec.raw
        step = "reset_session"
        try:
            if self._reset_hook is True:
                self._driver.reset_session(raw)  # type: ignore[union-attr]
                if self._configure is not None:
                    # the reset undid what configure set (RESET ALL,
                    # COM_RESET_CONNECTION): set up again, as a new one
                    step = "configure, after reset_session,"
                    self._configure(raw)
                    self._check_configured(raw)
                return True
            return self._reset_hook(raw) is not False  # type: ignore[misc,operator]
        except Exception as exc:
            logger.warning("pool %r: %s failed on connection %d: %r", self.name, step, rec.id, exc)
            return False

    @contextlib.contextmanager
    def _guarded_wait(self, rec: _Conn, timeout: float | None = None, what: str = "") -> Iterator[None]:
        """Around a wait for ``rec``'s server (a rollback on return, a reset
        or a ping at checkout) in a driver call that may have no timeout of
        its own: psycopg's rollback waits for a server that stopped
        answering until TCP gives up (15 minutes), PyMySQL's for ever. If no
        answer comes within ``timeout`` (``ping_timeout`` if None), the
        maintenance thread cuts the connection (see :meth:`_cut_overdue`):
        the driver call fails at once, and ``rec.cut`` tells the caller,
        after the block, to discard it. ``what``: the wait, for the log
        (the rollback, reset or ping if empty). Connections with no socket
        are not guarded."""
        if rec.fd is None:
            yield
            return
        with self._lock:
            due = self._clock() + (self._ping_timeout if timeout is None else timeout)
            self._guarded[rec] = due
            if due < self._wake_at:  # the maintenance thread would sleep past it
                self._wake.set()
            if what:
                rec.waiting_for = what
        try:
            yield
        finally:
            with self._lock:  # after this, no cut: rec.cut is final
                self._guarded.pop(rec, None)
                rec.waiting_for = ""

    def _cut_overdue(self, now: float) -> float | None:
        """Cut the guarded connections whose server has not answered by their
        deadline (see :meth:`_guarded_wait`): shut their socket down, so that the
        thread waiting in the driver gets its error. The socket is
        duplicated under the lock, while its owner cannot close it: the
        duplicate keeps the socket itself for the shutdown, not its number,
        which a close could hand to another connection meanwhile.

        Returns the earliest deadline still to come, or None if no
        connection is guarded (the maintenance thread of a closed pool runs
        until then: see ``_maintenance``)."""
        cut: list[tuple[_Conn, int, str]] = []
        with self._lock:
            for rec, deadline in list(self._guarded.items()):
                if now >= deadline:
                    del self._guarded[rec]
                    rec.cut = True
                    self._cuts += 1
                    with contextlib.suppress(OSError):  # closed already
                        cut.append((rec, os.dup(rec.fd), rec.waiting_for))  # type: ignore[arg-type]
            next_due = min(self._guarded.values(), default=None)
        if not cut:
            return next_due
        usual = (
            "its server did not answer the pool's rollback, reset or ping "
            f"within ping_timeout ({self._ping_timeout:g}s)"
        )
        for rec, fd, what in cut:
            logger.warning("pool %r: connection %d: %s; cutting it", self.name, rec.id, what or usual)
            try:
                sock = socket.socket(fileno=fd)
            except OSError:  # not a socket after all
                os.close(fd)
                continue
            with sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return next_due

    def _track_lease(self, rec: _Conn, now: float) -> None:
        """Leak tracking: note when and from where ``rec`` was checked out."""
        rec.checked_out_at = now
        rec.stack = [f for f in traceback.extract_stack() if not f.filename.startswith(_PACKAGE_DIR)]
        rec.leak_logged = False
        with self._lock:
            if self._out is not None:
                self._out.add(rec)

    def _ping(self, rec: _Conn) -> bool:
        """Ask the server; False if it did not answer as it should. The
        drivers that can bound their ping (psycopg, PyMySQL) do, with
        ``ping_timeout``; the others (and a ping hook) are cut then."""
        ok = True
        with self._guarded_wait(rec):
            try:
                if self._ping_hook is True:
                    self._driver.ping(rec.raw, self._ping_timeout)  # type: ignore[union-attr]
                elif callable(self._ping_hook) and self._ping_hook(rec.raw) is False:
                    ok = False
            except Exception as exc:
                logger.warning("pool %r: ping failed on connection %d: %r", self.name, rec.id, exc)
                ok = False
        if rec.cut:
            ok = False
        with self._lock:
            self._pings += 1
            if not ok:
                self._ping_failures += 1
        return ok

    # ---------------------------------------------------------------- return

    def _release(self, rec: _Conn) -> None:
        """Take back a connection the pool holds itself (a reclaimed orphan,
        one opened for ``min_size``): through a proxy, whose ``close()`` is
        the one return path."""
        _lease(self, rec).close()

    def _checkin(self, rec: _Conn, state: int | Exception | None) -> None:
        """The return path past the plain case (see ``PooledConnection.close``).
        ``state``: the transaction state close() read already, the error
        reading it raised, or None if it did not read it."""
        if rec.epoch != self._epoch:  # checked out before a fork: not ours to touch
            _INHERITED.append(rec.raw)
            return
        reason = rec.bad or None
        if reason is None and (self._closed or rec.generation != self._generation):
            # It will be closed anyway, and its server rolls back what is open
            # when it closes: no rollback to wait for (nor a server that may
            # not answer it, with nobody left to cut it once the pool is closed)
            reason = "closed" if self._closed else "invalidated"
        if reason is None:
            try:
                with self._guarded_wait(rec):
                    reason = self._return_checks(rec, state)
            except BaseException:
                # interrupted in the rollback or is_valid (KeyboardInterrupt): the
                # connection's state is unknown; close it rather than strand it
                self._put_back(rec, "bad")
                raise
            if rec.cut:
                reason = "bad"
        self._put_back(rec, reason)

    def _return_checks(self, rec: _Conn, state: int | Exception | None) -> str | None:
        """Roll back, put back changed settings, ask ``is_valid``; the reason
        to close ``rec``, or None to keep it (see :meth:`_checkin`)."""
        raw = rec.raw
        try:
            if isinstance(state, Exception):
                raise state
            if state is None:
                state = self._driver.transaction_state(raw)  # type: ignore[union-attr]
            if state:  # not IDLE
                if state == BROKEN:
                    return "bad"
                # IN_TRANSACTION or UNKNOWN
                self._driver.rollback(raw)  # type: ignore[union-attr]
        except Exception as exc:
            logger.warning("pool %r: rollback on return failed on connection %d: %r", self.name, rec.id, exc)
            return "bad"
        if rec.saved is not None:
            reason = self._restore_settings(rec)
            if reason is not None:
                return reason
        if self._reset_on_return:
            if rec.adopted:
                rec.adopted = False
            elif not self._reset_session(rec):
                return "invalid"
        if self._is_valid is not None:
            try:
                if not self._is_valid(raw):
                    return "invalid"
            except Exception as exc:
                logger.warning("pool %r: is_valid raised on connection %d: %r", self.name, rec.id, exc)
                return "invalid"
        rec.last_used = self._clock()
        return None

    def _restore_settings(self, rec: _Conn) -> str | None:
        """Put back the settings the caller changed through the proxy, after
        the rollback (psycopg changes autocommit only outside a transaction);
        the reason to close the connection if that fails, or None."""
        saved, rec.saved = rec.saved, None
        assert saved is not None
        try:
            for name, value in saved.items():
                if isinstance(value, _Undo):
                    with contextlib.suppress(ValueError):  # the caller removed it already
                        value.undo()
                    continue
                if value is _unknown:
                    logger.warning(
                        "pool %r: closing connection %d on return: %s() cannot be undone for the next borrower",
                        self.name,
                        rec.id,
                        name,
                    )
                    return "changed"
                if value is _unset:
                    delattr(rec.raw, name)
                else:
                    self._driver.set_setting(rec.raw, name, value)  # type: ignore[union-attr]
        except Exception as exc:
            logger.warning("pool %r: restoring %s on return failed on connection %d: %r", self.name, name, rec.id, exc)
            return "bad"
        rec.ticket = rec.era  # the plain return path again
        return None

    def _put_back(self, rec: _Conn, reason: str | None) -> None:
        """:meth:`_put_back_locked`, then close ``rec`` if it said why."""
        with self._lock:
            reason = self._put_back_locked(rec, reason)
        if reason is not None:
            self._log_discard(rec, reason)
            self._retire(rec, reason)

    def _put_back_locked(self, rec: _Conn, reason: str | None) -> str | None:
        """Hand ``rec`` to a waiter or keep it idle, and return None; or return
        why it must be closed instead."""
        if self._out is not None:
            self._out.discard(rec)
        if reason is None:
            if self._closed:
                reason = "closed"
            elif rec.generation != self._generation:
                reason = "invalidated"
            elif self._open > self._max_size:
                reason = "resized"
            elif self._waiters:
                waiter = self._waiters[0]
                now = time.monotonic()
                self._returned_at = now
                if rec.turn_mark:  # a sample, capped: the mark may be from long ago
                    self._hold_avg += (min(now - rec.turn_mark, 0.1) - self._hold_avg) * 0.125
                if (
                    rec.turn_mark  # a turn starts with a hand-off
                    and self._looping
                    and rec.streak < self._handoff_streak
                    and self._hold_avg < _QUICK
                    and rec.streak * self._hold_avg < _TURN
                    and now < waiter.young_until
                    and len(self._idle) < self._max_idle
                ):
                    # Callers come straight back for another connection, and
                    # the oldest waiter is young: keep this one idle for its
                    # caller, which saves two thread switches. Connections
                    # returned earlier and not taken back go to the waiters.
                    rec.streak += 1
                    rec.turn_mark = now
                    self._serve_idle_locked()
                    self._idle.append(rec)
                    return None
                # straight to the oldest waiter (on top of the stack, it is
                # served first), then any left over to the next ones
                self._idle.append(rec)
                self._serve_idle_locked()
                return None
            elif len(self._idle) < self._max_idle:
                self._idle.append(rec)
                return None
            else:
                reason = "idle"
        self._closing += 1
        return reason

    def _discard(self, rec: _Conn, reason: str) -> None:
        """Let go of a connection taken for a caller that failed its checks
        at checkout: it was never handed out."""
        with self._lock:
            self._closing += 1
            if self._out is not None:
                self._out.discard(rec)
            self._acquired -= 1
        self._log_discard(rec, reason)
        self._retire(rec, reason)

    def _grant_locked(self) -> None:
        """Slots freed: let the oldest waiters open connections in them."""
        while self._waiters and self._open < self._max_size and not self._closed:
            waiter = self._waiters.popleft()
            waiter.grant = True
            self._open += 1
            self._opening += 1
            waiter.lock.release()

    def _release_slot_locked(self) -> None:
        self._open -= 1
        self._opening -= 1
        self._grant_locked()

    def _log_discard(self, rec: _Conn, reason: str) -> None:
        if reason in ("bad", "invalid"):
            logger.warning("pool %r: discarded connection %d (%s)", self.name, rec.id, reason)
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("pool %r: closing connection %d (%s)", self.name, rec.id, reason)

    def _retire(self, rec: _Conn, reason: str, *, keep_slot: bool = False) -> None:
        """Close a connection the pool lets go of, then give up its slot.

        The slot is freed only once the close has returned, so that at no
        moment are more than ``max_size`` connections open (a waiter granted
        the slot would otherwise connect while this one is still closing).
        ``keep_slot``: the caller opens a replacement in it."""
        rec.retired = True
        try:
            self._close_raw(rec.raw)
        finally:
            # even if the close was interrupted (KeyboardInterrupt): the driver's
            # object then closes when collected, and a slot kept would be lost
            if rec.poller is not None:
                rec.poller.close()
            with self._lock:
                self._closed_total += 1
                if reason in self._closed_by:
                    self._closed_by[reason] += 1
                if not keep_slot:
                    self._open -= 1
                    self._closing -= 1
                    if self._plain_ticket is _NO_TICKET:  # shrunk: fits again now?
                        self._update_return_path_locked()
                    self._grant_locked()
                if self._closed and not self._in_use_locked():
                    self._returned.notify_all()

    def _retire_all(self, recs: list[_Conn], reason: str) -> None:
        """Retire each of ``recs`` (taken off the idle stack and counted as
        closing). If one close is interrupted (KeyboardInterrupt), the rest
        are still retired before the interruption goes on: left out, their
        slots would be lost to the pool for good."""
        left = iter(recs)
        try:
            for rec in left:
                self._retire(rec, reason)
        finally:
            for rec in left:  # only after an interruption
                self._retire(rec, reason)

    def _close_raw(self, raw: Any) -> None:
        try:
            raw.close()
        except Exception as exc:
            logger.debug("pool %r: closing a connection raised %r", self.name, exc)

    def _reclaim_orphans(self) -> None:
        """Connections whose proxy was garbage collected without being returned."""
        while True:
            try:
                rec = self._orphans.popleft()
            except IndexError:
                return
            logger.warning(
                "pool %r: connection %d was dropped without being returned; reclaiming it",
                self.name,
                rec.id,
            )
            self._release(rec)

    # ---------------------------------------------------------------- errors

    def _observe(self, rec: _Conn, exc: BaseException, *, during_commit: bool = False) -> BaseException | None:
        """The driver raised ``exc`` on a checked-out connection: act on its
        category. Returns the exception to raise instead, or None."""
        c = self.classify(exc, during_commit=during_commit, connection=rec.raw)
        remember(exc, c)  # for pool.run's retry, which decides once the connection is back
        if not c.discards_connection:
            return None
        rec.bad = "bad"
        rec.ticket = None  # off the plain return path
        if c.category is Category.NOT_LEADER:
            logger.warning(
                "pool %r: %s on connection %d: the node does not take writes; invalidating the pool",
                self.name,
                c.reason,
                rec.id,
            )
            not_leader = getattr(self._connect, "not_leader", None)  # poolkit.failover: move on to the next node
            if not_leader is not None:
                try:
                    not_leader(rec.raw)
                except Exception as hook_exc:
                    logger.warning("pool %r: the connect callable's not_leader() raised %r", self.name, hook_exc)
            self.invalidate()
        elif c.category is Category.AMBIGUOUS:
            err = AmbiguousCommitError(
                f"the outcome of the commit is unknown ({c.reason}): it may or may not have been applied"
            )
            err.classification = c  # type: ignore[attr-defined]
            return err
        return None

    def classify(self, exc: BaseException, *, during_commit: bool = False, connection: Any = None) -> Classification:
        """Classify ``exc`` with this pool's classifier (see :func:`poolkit.classify`)."""
        if self._classifier is not None:
            found = self._classifier(exc)
            if found is not None:
                if during_commit and found.category is Category.BAD_CONNECTION:
                    return Classification(Category.AMBIGUOUS, found.reason, found.source)
                return found
        return classify(exc, during_commit=during_commit, connection=connection, driver=self._driver)

    # ------------------------------------------------------------ management

    def invalidate(self) -> None:
        """Retire every connection that exists now: idle ones are closed at
        once, checked-out ones when returned, and ones being opened right now
        are closed when the connect finishes. None is handed out again."""
        with self._lock:
            self._new_generation_locked()
            idle, self._idle = self._idle, []
            self._closing += len(idle)
            generation = self._generation
        logger.info("pool %r: invalidated (generation %d); closing %d idle", self.name, generation, len(idle))
        self._retire_all(idle, "invalidated")

    def resize(self, max_size: int) -> None:
        """Change ``max_size``. Growing lets waiters open connections at once;
        shrinking closes idle ones now and returned ones until the pool fits."""
        _check_number("max_size", max_size, minimum=1, integer=True)
        closing: list[_Conn] = []
        with self._lock:
            if max_size < self._min_size:
                raise ValueError(f"max_size ({max_size}) must not be below min_size ({self._min_size})")
            self._max_size = max_size
            option = self._max_idle_option
            self._max_idle = max_size if option is None else min(option, max_size)
            self._update_return_path_locked()
            excess = min(len(self._idle), max(0, self._open - max_size))
            closing, self._idle = self._idle[:excess], self._idle[excess:]  # oldest first
            self._closing += len(closing)
            self._grant_locked()
        self._retire_all(closing, "resized")

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiters get :class:`PoolClosed`, idle connections are
        closed now, checked-out ones when returned. Waits up to ``timeout``
        seconds, in all, for checked-out connections to come back (one whose
        return waits for a server that stopped answering is cut when its
        ``ping_timeout`` is up, as in an open pool)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._update_return_path_locked()
            idle, self._idle = self._idle, []
            self._closing += len(idle)
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.error = PoolClosed(f"pool {self.name!r} was closed while waiting")
                waiter.lock.release()
            for job in self._connecting:
                if not job.finished:  # its connect goes on, and closes what it makes
                    job.error = PoolClosed(f"pool {self.name!r} was closed while connecting")
                    job.finished = job.gone = True
                    job.done.release()
            self._connecting.clear()
        end = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        self._retire_all(idle, "closed")
        maintainer = self._maintainer
        if maintainer is not None and maintainer is not threading.current_thread() and maintainer.is_alive():
            # its round in flight, and then its cuts of the connections whose
            # return or ping still waits for a server (see _maintenance)
            maintainer.join(_bounded(end - time.monotonic()))
        with self._lock:
            while self._in_use_locked() and (left := end - time.monotonic()) > 0:
                self._returned.wait(_bounded(left))
            still_out = self._in_use_locked()
        if still_out:
            logger.warning(
                "pool %r: closed with %d connections still checked out; they close when returned",
                self.name,
                still_out,
            )
        logger.info("pool %r: closed", self.name)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_size(self) -> int:
        return self._max_size

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------- maintenance

    def _maintain(self) -> float | None:
        """One round of housekeeping (the maintenance thread calls it every
        ``maintenance_interval``): close idle connections past their idle
        time or lifetime, cut overdue waits, reclaim dropped proxies, log
        leaks, keep min_size. Returns the earliest deadline of a guarded
        wait still to come (see :meth:`_cut_overdue`)."""
        now = self._tick_clock()
        closing: list[tuple[_Conn, str]] = []
        with self._lock:
            if self._closed:
                return None
            keep: list[_Conn] = []
            for rec in self._idle:
                if now >= rec.expires_at:
                    closing.append((rec, "expired"))
                elif now - rec.last_used > self._max_idle_time:
                    closing.append((rec, "idle"))
                else:
                    keep.append(rec)
            self._idle = keep
            self._closing += len(closing)
            leak_check = list(self._out) if self._out is not None else []
        for rec, reason in closing:
            self._log_discard(rec, reason)
            self._retire(rec, reason)
        with self._lock:  # top up to min_size once the expired ones are gone
            missing = 0 if self._closed or now < self._fill_after else max(0, self._min_size - self._open)
            self._open += missing
            self._opening += missing
        due = self._cut_overdue(now)
        self._reclaim_orphans()
        for rec in leak_check:
            self._check_leak(rec, now)
        if missing:
            # In a thread of its own, as a caller's connect (_open_for_caller):
            # a connect that hangs holds up the next round (idle time,
            # lifetime, leaks) one interval at most, not until the driver
            # gives up (130 s, psycopg's default). The slots it holds keep
            # the rounds meanwhile from opening more than min_size.
            filler = threading.Thread(target=self._fill, args=(missing,), name=f"poolkit-fill-{self.name}", daemon=True)
            try:
                filler.start()
            except RuntimeError:  # no thread to be had: the next round tries again
                with self._lock:
                    for _ in range(missing):
                        self._release_slot_locked()
                raise
            filler.join(_bounded(self._maintenance_interval))
        return due

    def _fill(self, missing: int) -> None:
        """Open ``missing`` connections in the slots the maintenance round
        reserved, until one fails."""
        taken = 0
        try:
            while taken < missing:
                taken += 1  # that slot is _fill_one's: it gives it back if its connect fails
                if not self._fill_one():
                    break  # the server does not answer
        finally:  # give back the other slots
            with self._lock:
                for _ in range(missing - taken):
                    self._release_slot_locked()

    def _fill_one(self) -> bool:
        """Open one connection in a slot the maintenance round reserved;
        False if that failed. Failures in a row back off (see
        ``_FILL_BACKOFF_MAX``), and only the first of them warns: the
        connect errors of callers who need a connection still do, each."""
        quiet = self._fill_failures > 0
        try:
            rec = self._open_in_slot(time.monotonic(), quiet=quiet)  # one attempt, no waiting
        except Exception as exc:
            with self._lock:
                self._fill_failures += 1
                wait = min(_FILL_BACKOFF_MAX, self._maintenance_interval * 2**self._fill_failures)
                wait *= 0.5 + self._random.random() / 2
                self._fill_after = self._clock() + wait
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "pool %r: could not open a connection to keep min_size: %r; trying again in %.1fs%s",
                self.name,
                exc,
                wait,
                " (and after longer waits, logged at DEBUG, until a connect succeeds)" if not quiet else "",
            )
            return False
        if rec is not None:
            self._adopt(rec)
        return True

    def _check_leak(self, rec: _Conn, now: float) -> None:
        assert self._leak_timeout is not None
        if rec.leak_logged or now - rec.checked_out_at < self._leak_timeout:
            return
        rec.leak_logged = True
        where = "".join(traceback.format_list(rec.stack)) if rec.stack else "(unknown)\n"
        logger.warning(
            "pool %r: connection %d checked out for %.1fs (leak_timeout %.1fs); checked out at:\n%s",
            self.name,
            rec.id,
            now - rec.checked_out_at,
            self._leak_timeout,
            where,
        )

    def _reset_after_fork(self) -> None:
        """In a forked child: forget (but keep alive) every inherited connection."""
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        for rec in self._idle:
            rec.retired = True
            _INHERITED.append(rec.raw)
        self._idle = []
        self._out = weakref.WeakSet() if self._out is not None else None
        self._waiters = deque()
        self._connecting = set()
        self._guarded = {}
        self._orphans = deque()
        self._open = 0
        self._opening = 0
        self._closing = 0
        self._epoch += 1
        self._new_generation_locked()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wake_at = _INF
        self._maintainer = None

    # ----------------------------------------------------------------- stats

    def stats(self) -> PoolStats:
        """A consistent snapshot of the gauges and counters."""
        with self._lock:
            return PoolStats(
                name=self.name,
                max_size=self._max_size,
                open=self._open - self._opening,
                opening=self._opening,
                in_use=self._in_use_locked(),
                idle=len(self._idle),
                waiting=len(self._waiters),
                generation=self._generation,
                acquired=int(self._acquired),
                wait_count=self._wait_count,
                wait_time=self._wait_time,
                timeouts=self._timeouts,
                created=self._created,
                closed=self._closed_total,
                closed_bad=self._closed_by["bad"],
                closed_expired=self._closed_by["expired"],
                closed_idle=self._closed_by["idle"],
                closed_invalidated=self._closed_by["invalidated"],
                closed_invalid=self._closed_by["invalid"],
                pings=self._pings,
                ping_failures=self._ping_failures,
                retries=self._retries,
                connect_errors=self._connect_errors,
                connects_abandoned=self._connects_abandoned,
                cuts=self._cuts,
            )

    def reset_stats(self) -> None:
        """Zero the counters (not the gauges), atomically with respect to
        every concurrent update."""
        with self._lock:
            self._zero_counters_locked()

    def export_stats(self, path: str | os.PathLike[str]) -> None:
        """Write ``stats()`` as JSON to ``path`` through a temporary file and
        ``os.replace``: a reader sees the old file or the new one, never half."""
        write_json_atomic(path, self.stats().as_dict())

    def _count_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def __repr__(self) -> str:
        with self._lock:
            state = "closed " if self._closed else ""
            return (
                f"<Pool {self.name!r} {state}open={self._open - self._opening} in_use={self._in_use_locked()} "
                f"idle={len(self._idle)} waiting={len(self._waiters)} gen={self._generation}>"
            )

    # ---------------------------------------------------------- running work

    def run(
        self,
        fn: Callable[[PooledConnection], T],
        *,
        idempotent: bool = False,
        retry: Retry | bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        isolation_level: str | enum.Enum | None = None,
    ) -> T:
        """Run ``fn(conn)`` in a transaction (commit on success, rollback on
        error) and return its result, retrying only what is safe to repeat.
        ``isolation_level``: "SERIALIZABLE", "REPEATABLE READ", "READ
        COMMITTED" or "READ UNCOMMITTED" for this transaction (the
        connection's own level if None). See :mod:`poolkit.retry`."""
        from poolkit.retry import run

        return run(
            self,
            fn,
            idempotent=idempotent,
            retry=retry,
            request_id=request_id,
            timeout=timeout,
            isolation_level=isolation_level,
        )

    def prune_requests(self, older_than: float, timeout: float | None = None) -> int:
        """Delete request ids recorded more than ``older_than`` seconds ago
        from the ledger; returns how many. Pick an age longer than any retry
        of the same id can come (a day, say)."""
        _check_number("older_than", older_than)
        with self.acquire(timeout) as conn:
            return self.ledger.prune(conn, older_than)

    def transaction(self, timeout: float | None = None, isolation_level: str | enum.Enum | None = None) -> Any:
        """``with pool.transaction() as conn:`` commits on success and rolls
        back on error; never retries. A commit that loses its connection
        raises :class:`AmbiguousCommitError`. ``isolation_level``: as for
        :meth:`run`."""
        from poolkit.retry import isolation, transaction

        return transaction(self, timeout, isolation(isolation_level))  # refused now, not on entering


def _is_connect_failure(exc: BaseException) -> bool:
    """Whether a connect error is worth trying again (the server may come
    back): network and database errors are; a TypeError from bad arguments
    is not."""
    if isinstance(exc, (OSError, EOFError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"OperationalError", "InterfaceError", "DatabaseError"})


class _Setting:
    """A setting of the driver's connection, read and changed through the
    proxy; what a caller changes is undone when it returns the connection
    (see :meth:`PooledConnection._set_setting`). A class attribute, so the
    hot path's own attribute stores stay as fast as before."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, proxy: PooledConnection | None, owner: type | None = None) -> Any:
        if proxy is None:
            return self
        raw = proxy._raw()
        if proxy._pool._driver.setting_is_method(raw, self.name):  # type: ignore[union-attr]
            # a method that changes it (PyMySQL's conn.autocommit(True))
            return functools.partial(proxy._set_setting, self.name)
        return getattr(raw, self.name)

    def __set__(self, proxy: PooledConnection, value: Any) -> None:
        proxy._set_setting(self.name, value)


class PooledConnection:
    """What ``pool.acquire()`` hands out: the DB-API connection's methods,
    with the driver's errors watched and acted on. ``close()`` returns it."""

    __slots__ = ("__weakref__", "_pool", "_rec")
    # No __init__: the pool builds its proxies with _lease(). Calling the
    # class with no arguments and setting two slots costs 300 instructions
    # less than an __init__ frame or object.__new__ (whose wrapper searches
    # the bases), and this runs on every checkout.
    _pool: Pool
    _rec: _Conn | None

    # Settings of the driver's connection a caller may change through the
    # proxy (psycopg, sqlite3, PyMySQL): undone when it returns the
    # connection. Any other attribute is read through; set it on
    # ``driver_connection``, and it is not undone.
    autocommit = _Setting()
    isolation_level = _Setting()
    read_only = _Setting()
    deferrable = _Setting()
    row_factory = _Setting()
    text_factory = _Setting()
    prepare_threshold = _Setting()
    select_db = _Setting()  # PyMySQL's: a method that changes the default database
    cursor_factory = _Setting()
    server_cursor_factory = _Setting()
    prepared_max = _Setting()  # psycopg's
    cursorclass = _Setting()  # PyMySQL's: DictCursor rows have no row[0]

    def _raw(self) -> Any:
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        return rec.raw

    @property
    def driver_connection(self) -> Any:
        """The driver's own connection object (do not close it)."""
        return self._raw()

    @property
    def closed(self) -> bool:
        return self._rec is None

    @property
    def pool(self) -> Pool:
        return self._pool

    def cursor(self, *args: Any, **kwargs: Any) -> PooledCursor:
        rec = self._rec  # self._raw(), inlined: every query goes through here
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        try:
            cur = rec.raw.cursor(*args, **kwargs)
        except Exception as exc:
            self._raise_observed(exc)
        if kwargs and kwargs.get("withhold"):
            # psycopg's WITH HOLD server cursor outlives the transaction, and
            # so the checkout: left open, it kept its rows on the server and
            # its name taken for the next borrower (DuplicateCursor).
            _save(rec, f"cursor#{len(rec.saved or ())}", _Undo(functools.partial(_close_held_cursor, cur)))
        return _wrap_cursor(cur, self)

    def execute(self, *args: Any, **kwargs: Any) -> PooledCursor:
        """For drivers whose connections have ``execute`` (sqlite3, psycopg)."""
        raw = self._raw()
        try:
            cur = raw.execute(*args, **kwargs)
        except Exception as exc:
            self._raise_observed(exc)
        self._refuse_if_ended()
        return _wrap_cursor(cur, self)

    def commit(self) -> None:
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        if rec.owner is not None:
            self._refuse_if_owned("commit()")
        try:
            rec.raw.commit()
        except Exception as exc:
            self._raise_observed(exc, during_commit=True)

    def rollback(self) -> None:
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        if rec.owner is not None:
            self._refuse_if_owned("rollback()")
        try:
            rec.raw.rollback()
        except Exception as exc:
            self._raise_observed(exc)

    @property
    def ping(self) -> Callable[..., Any]:
        """The driver's own ``ping()`` (PyMySQL's), which never reconnects
        here, whatever it is asked: PyMySQL's ``ping(reconnect=True)`` (its
        default before 1.2) opened a new session behind the pool's back, and
        work in ``pool.run`` went on in it, outside its transaction: the
        half done before was lost, the rest committed, and the call reported
        success. A dead connection raises, and the pool replaces it. (An
        AttributeError, as before, for a driver whose connections have none.)"""
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        return functools.partial(self._ping, rec, rec.raw.ping)

    def _ping(self, rec: _Conn, ping: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._rec is not rec:
            raise ConnectionReturned(_RETURNED)
        keep = rec.pool._driver.no_reconnect(rec.raw)  # type: ignore[union-attr]
        if keep:
            args, kwargs = (), {**{k: v for k, v in kwargs.items() if k not in keep}, **keep}
        try:
            return ping(*args, **kwargs)
        except Exception as exc:
            self._raise_observed(exc)

    def _end(self, commit: bool) -> None:
        """End the transaction the pool began (``pool.run``,
        ``pool.transaction``) through the driver, which ends it whatever the
        connection's mode: sqlite3's own commit() and rollback() do nothing
        in autocommit mode, and the pool's BEGIN would have stayed open."""
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        driver: Driver = rec.pool._driver  # type: ignore[union-attr,assignment]
        try:
            if commit:
                driver.commit(rec.raw)
            else:
                driver.rollback(rec.raw)
        except Exception as exc:
            self._raise_observed(exc, during_commit=commit)

    def close(self) -> None:
        """Return the connection to its pool. A second call does nothing.

        This is the pool's return path, whole: a checkin is one Python call,
        not two (the pool gives connections it takes back itself to a proxy
        too: see ``Pool._release``). Past the plain case it goes on in
        ``Pool._checkin``."""
        rec = self._rec
        if rec is None:
            return
        self._rec = None
        # the record's pool, not self._pool: on 3.11 this class's __getattr__
        # makes each attribute read on self cost ten times a plain one
        pool: Pool = rec.pool  # type: ignore[assignment]
        rec.pool = None
        try:
            # The state the driver keeps, read without a round trip (see
            # Driver.transaction_state), and so read for every connection,
            # plain or not, before the plain case is known: a test on each
            # side of the lock was 140 instructions more.
            # The driver's method, looked up on the driver: a call both 3.11
            # and 3.13 specialise (a bound method kept in a slot, 3.11 not).
            state = pool._driver.transaction_state(rec.raw)  # type: ignore[union-attr]
        except Exception as exc:
            pool._checkin(rec, exc)
            return
        if state:  # not IDLE: roll back, or let it go
            pool._checkin(rec, state)
            return
        rec.last_used = pool._now  # by the clock of the last tick (see Pool._tick_clock)
        lock = pool._lock
        lock.acquire()  # by hand, as in acquire(): this is the hot path
        try:
            # The plain case, its conditions in one compare (see
            # Pool._update_return_path_locked): the current generation, so not
            # inherited across a fork; not bad; no setting to put back; no
            # is_valid hook to run; and nobody waits.
            if rec.ticket is pool._plain_ticket and not pool._waiters:
                pool._idle.append(rec)
                return
        finally:
            lock.release()
        if rec.ticket is pool._plain_ticket:
            pool._put_back(rec, None)  # someone waits, or the pool changed meanwhile
        else:
            pool._checkin(rec, state)

    def _set_setting(self, name: str, value: Any) -> None:
        """Change a setting of the driver's connection (``conn.autocommit =
        True``, ``conn.row_factory = sqlite3.Row``...) for this checkout: the
        value it had before is saved, and put back when the connection is
        returned, so the next caller gets the connection as it was opened."""
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        if rec.owner is not None and name in _ENDS_TRANSACTION:
            self._refuse_if_owned(f"a change of {name}")
        pool: Pool = rec.pool  # type: ignore[assignment]
        driver = pool._driver
        assert driver is not None
        saved = rec.saved
        first = saved is None or name not in saved
        try:
            before = _unset
            if first:
                with contextlib.suppress(AttributeError):  # an attribute of the caller's own: removed on return
                    before = driver.get_setting(rec.raw, name)
            driver.set_setting(rec.raw, name, value)
        except Exception as exc:
            self._raise_observed(exc)
        if first:
            _save(rec, name, before)

    def _refuse_if_owned(self, what: str) -> None:
        """Raise :class:`ManagedTransactionError` if pool.run or
        pool.transaction owns this connection's transaction (see
        :meth:`_own`): ``what`` would end it."""
        rec = self._rec
        owner = rec.owner if rec is not None else None
        if owner is not None and owner[0] is self:
            raise _owned(owner[1], what)

    def _refuse_if_ended(self) -> None:
        """After a statement of pool.run's work or a pool.transaction()
        block: raise :class:`ManagedTransactionError` if the transaction
        has ended on the server since it was seen open (COMMIT or ROLLBACK
        sent as SQL, a statement that commits implicitly). On psycopg and
        sqlite3 it is open from the pool's BEGIN; on PyMySQL with autocommit
        off, from the first statement that needs one (MySQL begins it then).
        What came before it is committed (or rolled back) already; raising
        stops the rest from running outside the transaction, and a retry
        from running the committed part again."""
        rec = self._rec
        owner = rec.owner if rec is not None else None
        if owner is None or owner[0] is not self:
            return
        driver: Driver = rec.pool._driver  # type: ignore[union-attr,assignment]
        state = driver.transaction_state(rec.raw)  # type: ignore[union-attr]
        if state == IN_TRANSACTION:
            rec.owner_in_transaction = True  # type: ignore[union-attr]
        elif rec.owner_in_transaction and state != BROKEN:  # type: ignore[union-attr]
            # (BROKEN: PyMySQL's unbuffered result still being read, say)
            raise ManagedTransactionError(
                f"the transaction of {owner[1]} ended inside it (COMMIT or ROLLBACK sent as SQL, or a statement "
                "that commits implicitly): what came before is committed or rolled back already, and the rest "
                f"would have run outside it. Nothing more was sent; {owner[1]} commits or rolls back itself"
            )

    def _refuse_commit_first(self, name: str) -> None:
        """Refuse ``name`` of the driver's connection (or of its cursors) if
        it would commit the transaction pool.run or pool.transaction owns
        first (see ``Driver.commits_first``)."""
        rec = self._rec
        if rec is not None and rec.owner is not None:
            driver: Driver = rec.pool._driver  # type: ignore[union-attr,assignment]
            if driver.commits_first(rec.raw, name):
                self._refuse_if_owned(f"{name}(), which commits the open transaction first ({driver.name}),")

    def _own(self, where: str) -> tuple[_Conn, _Held]:
        """Until :meth:`_disown`, the transaction on this connection is
        ``where``'s (pool.run, pool.transaction): commit(), rollback() and a
        change of autocommit or isolation_level raise
        :class:`ManagedTransactionError`, and the connection counts as held
        by this thread (see ``_HOLDING``). Returns what to give back."""
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        rec.owner = (self, where)
        driver: Driver = rec.pool._driver  # type: ignore[union-attr,assignment]
        rec.owner_in_transaction = driver.transaction_state(rec.raw) == IN_TRANSACTION
        return rec, _Held(self._pool)

    def _disown(self, owned: tuple[_Conn, _Held]) -> None:
        rec, held = owned
        held.release()
        if self._rec is rec:  # still this caller's (else another's now: leave it be)
            rec.owner = None

    def _notice(self, exc: BaseException, *, during_commit: bool = False) -> None:
        """Act on an error raised by the caller's code while it held this
        connection (possibly a driver error it wrapped): the same actions as
        for an error the proxy saw itself, once."""
        rec = self._rec
        if rec is not None and not rec.bad and isinstance(exc, Exception):
            self._pool._observe(rec, exc, during_commit=during_commit)

    def _raise_observed(self, exc: BaseException, *, during_commit: bool = False) -> Any:
        rec = self._rec
        if rec is not None:
            replacement = self._pool._observe(rec, exc, during_commit=during_commit)
            if replacement is not None:
                raise replacement from exc
        raise exc

    def __getattr__(self, name: str) -> Any:
        if name in _PROXY_SLOTS:  # not set: a proxy the pool did not make
            raise AttributeError(f"this PooledConnection was not made by a pool: {name} is not set")
        raw = self._raw()
        if name in _COMMITS_FIRST:
            self._refuse_commit_first(name)
        if name in _RECONNECTING and self._pool._driver.reconnects(raw, name):  # type: ignore[union-attr]
            raise AttributeError(
                f"{name}() is not available through the pool: this driver's {name}() opens a new session "
                "in place of the pooled one, behind the pool's back (and a transaction would go on in it, "
                "half lost). Return the connection (close it) and check out another; a dead one is replaced"
            )
        if name.startswith("set_") and name[4:] in SETTINGS and callable(getattr(raw, name, None)):
            # psycopg's set_autocommit(), set_read_only()...: the setting, by
            # another name, saved and put back on return like an assignment
            # (left on, the next borrower's writes committed as they ran, or
            # failed as read-only, which reads as a failover)
            return functools.partial(self._set_setting, name[4:])
        if (name in _UNRESTORABLE or name in _UNDONE_BY) and callable(getattr(raw, name, None)):
            return functools.partial(self._call_marked, name)
        return getattr(raw, name)

    def _call_marked(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A call of ``name`` on the driver's connection that the return must
        see to: undone then (``_UNDONE_BY``), or the connection closed rather
        than reused (``_UNRESTORABLE``)."""
        rec = self._rec
        if rec is None:
            raise ConnectionReturned(_RETURNED)
        try:
            result = getattr(rec.raw, name)(*args, **kwargs)
        except Exception as exc:
            self._raise_observed(exc)
        if name in _UNDONE_BY:
            undo = functools.partial(getattr(rec.raw, _UNDONE_BY[name]), *args, **kwargs)
            _save(rec, f"{name}#{len(rec.saved or ())}", _Undo(undo))
        else:
            _save(rec, name, _unknown)
        return result

    def __enter__(self) -> PooledConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rec = self._rec
        state = f"connection {rec.id}" if rec is not None else "returned"
        return f"<PooledConnection {state} of pool {self._pool.name!r}>"


_PROXY_SLOTS = frozenset(("_pool", "_rec"))
SETTINGS = frozenset(name for name, value in vars(PooledConnection).items() if isinstance(value, _Setting))


def _lease(pool: Pool, rec: _Conn) -> PooledConnection:
    """The proxy that hands ``rec`` out (inlined on the hot path of ``Pool.acquire``)."""
    rec.used = True
    proxy = PooledConnection()
    proxy._pool = rec.pool = pool
    proxy._rec = rec
    return proxy


class PooledCursor:
    """A driver cursor whose errors the pool watches."""

    __slots__ = ("_conn", "_cursor")

    def __init__(self, cursor: Any, conn: PooledConnection) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_conn", conn)

    def _cur(self) -> Any:
        if self._conn._rec is None:
            raise ConnectionReturned(_CURSOR_RETURNED)
        return self._cursor

    @property
    def connection(self) -> PooledConnection:
        conn: PooledConnection = self._conn
        return conn

    def execute(self, *args: Any, **kwargs: Any) -> PooledCursor:
        rec = self._conn._rec
        if rec is None:  # self._cur(), inlined here and in fetchall
            raise ConnectionReturned(_CURSOR_RETURNED)
        try:
            self._cursor.execute(*args, **kwargs)
        except Exception as exc:
            self._conn._raise_observed(exc)
        if rec.owner is not None:
            self._conn._refuse_if_ended()
        return self

    def executemany(self, *args: Any, **kwargs: Any) -> PooledCursor:
        cur = self._cur()
        try:
            cur.executemany(*args, **kwargs)
        except Exception as exc:
            self._conn._raise_observed(exc)
        self._conn._refuse_if_ended()
        return self

    def fetchone(self) -> Any:
        cur = self._cur()
        try:
            return cur.fetchone()
        except Exception as exc:
            return self._conn._raise_observed(exc)

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        cur = self._cur()
        try:
            return cur.fetchmany(*args, **kwargs)
        except Exception as exc:
            return self._conn._raise_observed(exc)

    def fetchall(self) -> Any:
        if self._conn._rec is None:
            raise ConnectionReturned(_CURSOR_RETURNED)
        try:
            return self._cursor.fetchall()
        except Exception as exc:
            return self._conn._raise_observed(exc)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def close(self) -> None:
        try:
            self._cursor.close()
        except Exception:
            if self._conn._rec is not None:
                raise

    def __enter__(self) -> PooledCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        cur = self._cur()
        if name in _COMMITS_FIRST:  # sqlite3's cursor.executescript()
            self._conn._refuse_commit_first(name)
        return getattr(cur, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cur(), name, value)


_new_cursor = object.__new__  # builds a cursor proxy without the frame of its __init__
_set_cursor = PooledCursor._cursor.__set__  # type: ignore[attr-defined]
_set_conn = PooledCursor._conn.__set__  # type: ignore[attr-defined]


def _wrap_cursor(cursor: Any, conn: PooledConnection) -> PooledCursor:
    """``PooledCursor(cursor, conn)`` for the hot path: through the slots'
    own descriptors, as ``__setattr__`` forwards to the driver's cursor."""
    pc: PooledCursor = _new_cursor(PooledCursor)
    _set_cursor(pc, cursor)
    _set_conn(pc, conn)
    return pc
