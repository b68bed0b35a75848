"""Unit tests of the pool core on the fake driver, with an injected clock."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import json
import logging
import math
import os
import random
import select
import sqlite3
import threading
import time
import weakref
from typing import Any

import fakedb
import pytest

import poolkit
from poolkit import Category, Classification, ConnectionReturned, Pool, PoolClosed, PoolTimeout, TooManyWaiters

# ------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        ({"max_size": 0}, ValueError, "max_size must be >= 1"),
        ({"max_size": 2.5}, TypeError, "max_size must be an int"),
        ({"max_size": True}, TypeError, "max_size must be an int"),
        ({"min_size": 5, "max_size": 2}, ValueError, "min_size (5) must not exceed max_size (2)"),
        ({"min_size": -1}, ValueError, "min_size must be >= 0"),
        ({"timeout": -1}, ValueError, "timeout must be >= 0"),
        ({"timeout": "3"}, TypeError, "timeout must be a number"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime must be > 0"),
        ({"max_idle_time": -5}, ValueError, "max_idle_time must be > 0"),
        ({"lifetime_jitter": 1.5}, ValueError, "lifetime_jitter"),
        ({"ping": "yes"}, TypeError, "ping must be True/False, None or a callable"),
        ({"reset_session": 3}, TypeError, "reset_session must be"),
        ({"reset_on": "close"}, ValueError, "reset_on must be 'checkout' or 'return', not 'close'"),
        ({"is_valid": True}, TypeError, "is_valid must be None or a callable"),
        ({"configure": 1}, TypeError, "configure must be"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be >= 0"),
        ({"ping_timeout": 0}, ValueError, "ping_timeout must be > 0"),
        ({"handoff_after": -0.1}, ValueError, "handoff_after must be >= 0"),
        ({"handoff_streak": -1}, ValueError, "handoff_streak must be >= 0"),
        ({"handoff_streak": 2.5}, TypeError, "handoff_streak must be an int"),
        ({"leak_timeout": 0}, ValueError, "leak_timeout must be > 0"),
        ({"name": 5}, TypeError, "name must be a str"),
        ({"retry": "always"}, TypeError, "retry must be"),
        ({"ledger_table": "x; DROP TABLE y"}, ValueError, "ledger table must be a plain SQL identifier"),
        ({"max_lifetime": float("nan")}, ValueError, "max_lifetime"),
        ({"ping_timeout": float("inf")}, ValueError, "ping_timeout must be at most 9.223e+09 seconds"),
        ({"maintenance_interval": 1e12}, ValueError, "maintenance_interval must be at most"),
    ],
)
def test_bad_configuration_is_refused_at_construction(
    server: fakedb.Server, kw: dict[str, Any], exc: type, text: str
) -> None:
    with pytest.raises(exc) as info:
        Pool(server.connect, **kw)
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("timeout", "exc", "text"),
    [
        ("5", TypeError, "timeout must be a number"),
        (True, TypeError, "timeout must be a number"),
        (-1, ValueError, "timeout must be >= 0"),
        (float("nan"), ValueError, "timeout must be >= 0"),
    ],
)
@pytest.mark.parametrize("idle", [True, False], ids=["connection idle", "none idle"])
def test_a_bad_checkout_timeout_is_refused_whether_or_not_a_connection_is_free(
    make_pool: Any, timeout: Any, exc: type, text: str, idle: bool
) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    if idle:
        held.close()
    with pytest.raises(exc, match=text):
        pool.acquire(timeout=timeout)
    with pytest.raises(exc, match=text):
        pool._acquire_fresh(timeout)  # pool.run's last attempt
    assert pool.stats().in_use == (0 if idle else 1)  # nothing was checked out
    held.close()


def test_connect_must_be_callable() -> None:
    with pytest.raises(TypeError, match="connect must be a zero-argument callable"):
        Pool("dbname=test")  # type: ignore[arg-type]


def test_every_option_is_in_the_readmes_table() -> None:
    import inspect
    import re

    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme, encoding="utf-8") as f:
        rows = set(re.findall(r"^\| `(\w+)` \|", f.read(), re.MULTILINE))
    options = set(inspect.signature(Pool).parameters) - {"connect"}
    assert options - rows == set(), "options missing from the README's table"


def test_option_none_means_no_limit(make_pool: Any) -> None:
    pool = make_pool(max_lifetime=None, max_idle_time=None, max_idle=None)
    with pool.connection() as conn:
        conn.cursor().execute("SELECT 1")
    assert pool.stats().idle == 1


# ------------------------------------------------------------- basic use


def test_checkout_returns_and_reuses_lifo(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=3)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    ids = [x.driver_connection.id for x in (a, b, c)]
    a.close()
    b.close()
    c.close()  # idle stack: a, b, c (c on top)
    with pool.connection() as conn:
        assert conn.driver_connection.id == ids[2]  # last in, first out
    with pool.connection() as conn:
        assert conn.driver_connection.id == ids[2]  # the hot one again
    assert len(server.connections) == 3


def test_using_a_returned_connection_raises_a_clear_error(make_pool: Any) -> None:
    pool = make_pool()
    conn = pool.acquire()
    cur = conn.cursor()
    conn.close()
    with pytest.raises(ConnectionReturned, match="returned to its pool"):
        conn.cursor()
    with pytest.raises(ConnectionReturned):
        conn.commit()
    with pytest.raises(ConnectionReturned):
        cur.execute("SELECT 1")
    with pytest.raises(ConnectionReturned):
        cur.fetchall()
    with pytest.raises(ConnectionReturned):
        cur.arraysize = 5
    conn.close()  # returning twice is harmless
    assert pool.stats().idle == 1
    assert pool.stats().in_use == 0


def test_the_hot_path_builds_the_same_proxy_as_the_pools_other_paths(make_pool: Any) -> None:
    # acquire() builds the proxy of an idle connection inline, not through
    # _lease(): every slot _lease() sets must be set there too
    from poolkit.pool import _lease

    pool = make_pool()
    with pool.connection():
        pass  # now one connection is idle, and the next checkout takes the hot path
    hot = pool.acquire()
    made = _lease(pool, hot._rec)
    for slot in poolkit.PooledConnection.__slots__:
        if slot != "__weakref__":
            assert getattr(hot, slot) is getattr(made, slot), slot
    assert hot.pool is pool and not hot.closed
    made._rec = None  # only one of the two may return it
    hot.close()
    assert pool.stats().idle == 1


def test_a_proxy_not_made_by_a_pool_says_so(make_pool: Any) -> None:
    # its slots are unset: __getattr__ must not recurse looking for them
    with pytest.raises(TypeError):
        poolkit.PooledConnection(make_pool(), None)  # type: ignore[call-arg]
    stray = poolkit.PooledConnection()
    with pytest.raises(AttributeError, match="not made by a pool"):
        stray.cursor()
    with pytest.raises(AttributeError, match="not made by a pool"):
        _ = stray.autocommit


def test_open_transaction_is_rolled_back_on_return(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        conn.cursor().execute("INSERT 1")
        raw = conn.driver_connection
        assert raw.in_transaction
    assert not raw.in_transaction
    assert raw.rollbacks == 1
    assert server.committed == []
    with pool.connection() as conn:  # no transaction: nothing to roll back
        assert conn.driver_connection is raw
    assert raw.rollbacks == 1


def test_connection_in_unknowable_state_is_closed_on_return(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    conn = pool.acquire()
    raw = conn.driver_connection
    raw.close()  # closed underneath the pool: state can't be read
    conn.close()
    s = pool.stats()
    assert s.open == 0 and s.closed_bad == 1


def test_configure_runs_once_per_new_connection(make_pool: Any) -> None:
    seen: list[int] = []
    pool = make_pool(configure=lambda raw: seen.append(raw.id))
    for _ in range(3):
        with pool.connection():
            pass
    assert len(seen) == 1


def test_repr_is_one_informative_line(make_pool: Any) -> None:
    pool = make_pool(name="orders", max_size=4)
    a = pool.acquire()
    b = pool.acquire()
    b.close()
    assert repr(pool) == "<Pool 'orders' open=2 in_use=1 idle=1 waiting=0 gen=0>"
    a.close()
    pool.invalidate()
    assert repr(pool) == "<Pool 'orders' open=0 in_use=0 idle=0 waiting=0 gen=1>"


# ------------------------------------------------------- limits, waiters


def test_never_more_than_max_size_open_with_100_threads(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=10, timeout=30)
    peak = 0
    lock = threading.Lock()
    barrier = threading.Barrier(100)
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal peak
        try:
            barrier.wait()
            for _ in range(20):
                with pool.connection() as conn:
                    conn.cursor().execute("SELECT 1")
                    with lock:
                        peak = max(peak, len(server.open_connections))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert peak <= 10
    assert len(server.open_connections) <= 10
    s = pool.stats()
    assert s.acquired == 2000
    assert s.created - s.closed == s.open


def test_waiters_are_served_first_in_first_out(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    order: list[int] = []

    def waiter(i: int, ev: threading.Event) -> None:
        ev.set()
        with pool.connection(timeout=10):
            order.append(i)

    threads = []
    for i in range(5):
        ev = threading.Event()
        t = threading.Thread(target=waiter, args=(i, ev))
        t.start()
        ev.wait()
        # wait until this thread is in the queue before starting the next
        deadline = time.monotonic() + 5
        while pool.stats().waiting < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        threads.append(t)
    held.close()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4]


def test_returned_connection_goes_straight_to_the_waiter(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    raw = held.driver_connection
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    while pool.stats().waiting < 1:
        time.sleep(0.001)
    held.close()
    t.join()
    assert got[0].driver_connection is raw
    assert pool.stats().idle == 0  # never went through the idle stack
    got[0].close()


@pytest.mark.timing
def test_waiter_never_waits_past_its_timeout(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    for timeout in (0.05, 0.2):
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=timeout)
        elapsed = time.monotonic() - t0
        assert timeout - 0.005 <= elapsed <= timeout + 0.05
    s = pool.stats()
    assert s.timeouts == 2 and s.waiting == 0
    held.close()


@pytest.mark.parametrize(
    ("kw", "timeout"),
    [
        ({"timeout": math.inf, "handoff_after": 0}, None),
        ({"handoff_after": 0}, math.inf),
        ({"handoff_after": 0}, 1e12),
        ({"timeout": math.inf, "handoff_after": 1e12}, None),  # the first wait: until young_until
    ],
)
def test_a_wait_longer_than_the_platform_can_time_is_a_wait_without_limit(
    make_pool: Any, kw: dict[str, Any], timeout: float | None
) -> None:
    # threading's locks refuse a timeout past threading.TIMEOUT_MAX (some 292
    # years) with OverflowError; a waiter given math.inf waits until served.
    # (handoff_after=0: the waiter's one wait is the long one; by default a
    # first wait of 50 ms comes before it)
    pool = make_pool(max_size=1, **kw)
    held = pool.acquire()
    raw = held.driver_connection

    def give_back() -> None:
        deadline = time.monotonic() + 5
        while pool.stats().waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        held.close()

    t = threading.Thread(target=give_back)
    t.start()
    with pool.acquire(timeout) as conn:
        assert conn.driver_connection is raw
    t.join()


def test_close_with_a_timeout_without_limit_waits_for_the_connections_out(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    later = threading.Timer(0.2, held.close)
    later.start()
    t0 = time.monotonic()
    pool.close(timeout=math.inf)
    assert time.monotonic() - t0 >= 0.15  # it waited for the return
    later.join()
    assert pool.stats().open == 0


def test_waiter_that_timed_out_never_receives_a_connection(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.01)
    held.close()
    s = pool.stats()
    assert s.idle == 1 and s.in_use == 0 and s.waiting == 0


def test_too_many_waiters_is_refused_at_once(make_pool: Any) -> None:
    pool = make_pool(max_size=1, max_waiting=1)
    held = pool.acquire()
    t = threading.Thread(target=lambda: pool.acquire(timeout=5).close())
    t.start()
    while pool.stats().waiting < 1:
        time.sleep(0.001)
    t0 = time.monotonic()
    with pytest.raises(TooManyWaiters, match="max_waiting"):
        pool.acquire(timeout=5)
    assert time.monotonic() - t0 < 0.5
    held.close()
    t.join()


def test_slow_connect_does_not_block_acquires_that_can_be_served(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=2)
    with pool.connection():
        pass  # one idle connection
    in_connect = threading.Event()
    release = threading.Event()
    a = pool.acquire()  # takes the idle one

    def slow() -> None:
        in_connect.set()
        release.wait(5)

    server.connect_hook = slow
    t = threading.Thread(target=lambda: pool.acquire(timeout=5).close())
    t.start()
    assert in_connect.wait(5)
    server.connect_hook = None
    a.close()
    t0 = time.monotonic()
    with pool.connection(timeout=1):  # served from idle while the other connect hangs
        pass
    assert time.monotonic() - t0 < 0.5
    release.set()
    t.join()


def test_connect_failure_retries_with_backoff_then_times_out_with_cause(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    server.down = True
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 0.1
    assert isinstance(info.value.__cause__, fakedb.OperationalError)
    assert pool.stats().connect_errors >= 2  # retried, with backoff
    assert pool.stats().open == 0  # the slot was given back
    assert pool.stats().timeouts == 1  # counted as a timeout, as a wait that ran out is


def test_a_connect_that_fails_until_the_deadline_counts_as_a_timeout_in_the_callers_thread(tmp_path: Any) -> None:
    # sqlite3 connects in the caller's thread (its connect cannot hang): the
    # PoolTimeout it ends in was not counted in stats().timeouts, the figure
    # that shows callers turned away.
    missing = str(tmp_path / "no-such-dir" / "x.db")
    with Pool(lambda: sqlite3.connect(missing, check_same_thread=False), max_size=1) as pool:
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0.3)
        assert pool.stats().timeouts == 1 and pool.stats().connect_errors >= 2


def test_connect_recovers_when_the_server_comes_back(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    server.connect_errors = [fakedb.OperationalError("connection refused")] * 3
    with pool.connection(timeout=10) as conn:
        assert conn.driver_connection.id == 1
    assert pool.stats().connect_errors == 3


def test_connect_programming_error_is_raised_at_once(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    server.connect_errors = [TypeError("unexpected keyword argument 'dbnmae'")]
    t0 = time.monotonic()
    with pytest.raises(TypeError, match="dbnmae"):
        pool.acquire(timeout=10)
    assert time.monotonic() - t0 < 1
    assert pool.stats().open == 0


@pytest.mark.parametrize(
    "returned, message",
    [
        (None, r"connect returned None, not a DB-API connection \(does it return the connection it opens\?\)"),
        (42, r"connect returned a builtins.int, not a DB-API connection: it has no cursor\(\), commit\(\)"),
        ("dbname=app", r"builtins.str, not a DB-API connection"),
    ],
    ids=["none", "int", "a-dsn"],
)
def test_a_connect_that_returns_no_connection_is_named_at_once(make_pool: Any, returned: Any, message: str) -> None:
    # A factory that forgot its return handed out a proxy of None, and the
    # error came at the first cursor(), as an AttributeError far from it.
    pool = make_pool(connect=lambda: returned, max_size=1)
    t0 = time.monotonic()
    with pytest.raises(TypeError, match=message):
        pool.acquire(timeout=10)
    assert time.monotonic() - t0 < 1  # not retried as a server that does not answer
    assert pool.stats().open == 0


# ------------------------------------------------------------ health hooks


def test_liveness_probe_discards_a_connection_killed_while_idle(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=2, ping=False)
    with pool.connection() as conn:
        first = conn.driver_connection
    first.kill()
    with pool.connection() as conn:  # the caller sees no error
        assert conn.driver_connection is not first
        conn.cursor().execute("SELECT 1")
    s = pool.stats()
    assert s.closed_bad == 1 and s.acquired == 2 and s.pings == 0


class _UnwatchableEpoll:
    """An epoll set that refuses the socket, as for a descriptor epoll cannot watch."""

    made: list[_UnwatchableEpoll] = []

    def __init__(self, *args: Any) -> None:
        self.closed = False
        self.made.append(self)

    def register(self, fd: int, events: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("failure", ["no descriptor to spare", "register refused"])
def test_liveness_probe_falls_back_to_poll_when_epoll_fails(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # The probe is an epoll set of its own. Out of descriptors (EMFILE), or
    # with the socket refused by epoll, the pool falls back to poll(), which
    # needs no descriptor, and still probes; a half-made set is closed.
    def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    _UnwatchableEpoll.made = []
    monkeypatch.setattr(select, "epoll", no_descriptors if failure == "no descriptor to spare" else _UnwatchableEpoll)
    pool = make_pool(max_size=2, ping=False)
    with pool.connection() as conn:
        first = conn.driver_connection
    first.kill()
    with pool.connection() as conn:
        assert conn.driver_connection is not first
    assert pool.stats().closed_bad == 1
    assert all(e.closed for e in _UnwatchableEpoll.made)
    if failure == "register refused":
        assert _UnwatchableEpoll.made


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_a_retired_connection_frees_its_probe_at_once(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1, ping=False)
    with pool.connection() as conn:
        raw = conn.driver_connection
    rec = pool._idle[-1]  # held on purpose: freeing must not wait for the garbage collector
    before = _open_fds()
    pool.invalidate()
    with pool.connection():
        pass  # the old connection is retired, a new one opened in its slot
    assert raw.closed
    # the old connection's socketpair and probe (3 descriptors) are gone, the
    # new one's are open: as many as before, not one more
    assert _open_fds() == before
    assert rec.retired


def test_liveness_probe_then_ping_keeps_a_readable_but_healthy_connection(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        raw = conn.driver_connection
    raw._server_end.send(b"N")  # an unsolicited message (a NOTICE): readable, not dead
    with pool.connection() as conn:
        assert conn.driver_connection is raw  # the ping said it's alive
    assert pool.stats().pings == 1


def test_ping_runs_only_after_ping_after_seconds_idle(make_pool: Any, clock: Any) -> None:
    pool = make_pool(ping_after=10)
    with pool.connection() as conn:
        raw = conn.driver_connection
    clock.advance(5)
    with pool.connection():
        pass
    assert raw.pings == 0
    clock.advance(11)
    with pool.connection():
        pass
    assert raw.pings == 1
    assert pool.stats().pings == 1


@pytest.mark.parametrize("embedded", [False, True], ids=["server", "embedded"])
def test_the_hot_path_reads_the_clock_once_for_a_server_never_for_an_embedded_database(
    make_pool: Any, clock: Any, embedded: bool
) -> None:
    # The return notes a connection's last use on the clock of the last tick
    # (Pool._tick_clock): no clock call. The checkout of a connection to a
    # server reads the clock (a process paused, the tick is late); that of an
    # embedded database, which nothing can cut while idle, does not.
    me = threading.get_ident()
    reads = 0

    def counting() -> float:
        nonlocal reads
        if threading.get_ident() == me:  # not the maintenance thread's
            reads += 1
        return clock()

    pool = make_pool(clock=counting, driver=fakedb.EmbeddedFakeDriver() if embedded else None)
    with pool.connection():
        pass
    before = reads
    for _ in range(100):
        with pool.connection():
            pass
    assert reads == before + (0 if embedded else 100)
    assert pool.stats().acquired == 101 and type(pool.stats().acquired) is int


@pytest.mark.parametrize("embedded", [False, True], ids=["server", "embedded"])
@pytest.mark.parametrize("seed", range(6))
def test_a_connection_due_for_a_look_is_never_handed_out_unchecked(
    make_pool: Any, clock: Any, seed: int, embedded: bool
) -> None:
    # The return notes the clock as the maintenance thread last read it, up
    # to a tick ago; so does the checkout of an embedded database's
    # connection. Ticks come at random, never more than a tick apart;
    # checkouts come at random between them. Whatever the lag, a connection
    # idle for ping_after is pinged, and one past its lifetime is not handed
    # out; and a connection idle for less than ping_after less a tick is not
    # pinged, nor one short of its lifetime replaced.
    rnd = random.Random(seed)
    pool = make_pool(
        max_size=1,
        ping_after=10,
        max_lifetime=100,
        lifetime_jitter=0,
        max_idle_time=None,
        driver=fakedb.EmbeddedFakeDriver() if embedded else None,
    )
    tick = pool._tick
    assert tick == 2.5  # ping_after / 4
    events: list[tuple[float, str]] = []
    start = t = clock.now
    while t < start + 1500:
        t += rnd.choice((rnd.uniform(0, 3), rnd.uniform(5, 15)))
        events.append((t, "checkout"))
    end, t = t, start
    while t < end:
        t += rnd.uniform(0.05, 1.0) * tick
        events.append((t, "tick"))
    events.sort()
    with pool.connection() as conn:
        raw, expires = conn.driver_connection, conn._rec.expires_at
    returned = clock.now
    seen = {"ping": 0, "fresh": 0, "expired": 0}
    for t, what in events:
        clock.now = t  # by hand: Clock.advance would tick the pool too
        if what == "tick":
            pool._tick_clock()
            continue
        pings = raw.pings
        with pool.connection() as conn:
            idle = t - returned
            if t >= expires:
                assert conn.driver_connection is not raw, (seed, t, expires)
                seen["expired"] += 1
                raw, expires = conn.driver_connection, conn._rec.expires_at
            else:
                assert conn.driver_connection is raw, (seed, t, expires)
                if idle >= 10:
                    assert raw.pings == pings + 1, (seed, idle)
                    seen["ping"] += 1
                elif idle < 10 - tick:
                    assert raw.pings == pings, (seed, idle)
                    seen["fresh"] += 1
        returned = t
    assert min(seen.values()) >= 5, seen  # each case came up


def test_a_connection_to_a_server_idle_through_a_pause_is_pinged_at_once(make_pool: Any, clock: Any) -> None:
    # The whole process paused (a frozen container, an AWS Lambda between
    # requests): the maintenance thread could not tick, and the first
    # checkout after it may come before its next tick. A connection to a
    # server, which a proxy may have cut meanwhile, is judged by the clock
    # itself: pinged at once. An embedded database's, which nothing cut, is
    # judged by the clock of the last tick: pinged once the tick comes.
    server_pool = make_pool(ping_after=10)
    embedded_pool = make_pool(ping_after=10, driver=fakedb.EmbeddedFakeDriver())
    raws = []
    for pool in (server_pool, embedded_pool):
        with pool.connection() as conn:
            raws.append(conn.driver_connection)
    clock.now += 600  # by hand: no tick
    for pool in (server_pool, embedded_pool):
        with pool.connection():
            pass
    assert [raw.pings for raw in raws] == [1, 0]
    embedded_pool._tick_clock()
    with embedded_pool.connection():
        pass
    assert raws[1].pings == 1


@pytest.mark.parametrize("embedded", [False, True], ids=["server", "embedded"])
def test_ping_after_zero_pings_every_reuse_however_late_the_tick(make_pool: Any, clock: Any, embedded: bool) -> None:
    # ping_after=0 asks for a ping at every reuse: not a deadline the hot
    # path compares, so a maintenance thread held up (no tick here while the
    # clock moves on) cannot let a reuse through unpinged. is_valid makes the
    # return note the connection's last use on the clock itself.
    driver = fakedb.EmbeddedFakeDriver() if embedded else None
    pool = make_pool(ping_after=0, is_valid=lambda raw: True, maintenance_interval=1.0, driver=driver)
    clock.now += 5  # by hand: no tick
    with pool.connection() as conn:
        raw = conn.driver_connection
    for i in range(3):
        clock.now += 5
        with pool.connection() as conn:
            assert conn.driver_connection is raw
        assert raw.pings == i + 1


def test_the_maintenance_thread_ticks_the_hot_paths_clock(server: fakedb.Server) -> None:
    # On the real clock, with the pool's own thread: a tick of 0.1 s (a
    # quarter of ping_after), and no round (which reads the clock too) within
    # the test. A connection of an embedded database (judged by the clock of
    # the last tick) idle past ping_after is pinged; one just returned is not.
    pool = Pool(server.connect, ping_after=0.4, maintenance_interval=30, driver=fakedb.EmbeddedFakeDriver())
    try:
        assert pool._tick == pytest.approx(0.1)
        with pool.connection() as conn:
            raw = conn.driver_connection
        time.sleep(0.05)
        with pool.connection():
            pass
        assert raw.pings == 0
        time.sleep(1.0)
        with pool.connection() as conn:
            assert conn.driver_connection is raw
        assert raw.pings == 1
    finally:
        pool.close()


def test_a_connection_opened_for_the_caller_is_handed_out_unpinged(make_pool: Any) -> None:
    # ping_after=0 pings every reuse. A connection opened for this checkout
    # has just talked to the server: it is not pinged, and so a ping that
    # always fails cannot make the pool discard and reopen for ever.
    pinged: list[Any] = []

    def ping(conn: Any) -> bool:
        pinged.append(conn)
        return False

    pool = make_pool(max_size=1, ping_after=0, ping=ping, timeout=1)
    with pool.connection() as conn:
        first = conn.driver_connection
    assert pinged == []
    with pool.connection() as conn:  # a reuse: pinged, refused, replaced
        assert conn.driver_connection is not first
    assert pinged == [first]
    assert pool.stats().closed_bad == 1


@pytest.mark.timing
def test_checks_past_the_timeout_give_way_to_a_new_connection(make_pool: Any) -> None:
    # Two idle connections whose pings each take 0.3 s and fail: a caller
    # with 0.2 s checks no more after the first, and gets a new connection
    # in the slot it freed, not one after a second slow ping.
    pool = make_pool(max_size=2, ping_after=0, ping=lambda conn: time.sleep(0.3) or False)
    held = [pool.acquire(), pool.acquire()]
    old = {c.driver_connection.id for c in held}
    for conn in held:
        conn.close()
    t0 = time.monotonic()
    with pool.acquire(timeout=0.2) as conn:
        assert time.monotonic() - t0 < 0.5
        assert conn.driver_connection.id not in old
    st = pool.stats()
    assert (st.closed_bad, st.idle, st.timeouts) == (1, 2, 0)


def test_checks_past_the_timeout_give_up_when_a_waiter_took_the_slot(make_pool: Any) -> None:
    # The slot the discarded connection frees goes to the caller waiting in
    # line, not to the one whose checks overran: that one times out.
    behind: list[Any] = []

    def ping(conn: Any) -> bool:
        t = threading.Thread(target=lambda: behind.append(pool.acquire(timeout=5)))
        t.start()
        while pool.stats().waiting != 1:
            time.sleep(0.001)
        time.sleep(0.15)  # past the caller's 0.1 s
        behind.append(t)
        return False

    pool = make_pool(max_size=2, ping_after=0, ping=ping)
    held = pool.acquire()
    pool.acquire().close()  # one idle
    with pytest.raises(PoolTimeout, match="1 discarded at checkout, the last as 'bad'"):
        pool.acquire(timeout=0.1)
    t = behind.pop(0)
    t.join(5)
    (served,) = behind
    served.close()
    held.close()
    st = pool.stats()
    assert (st.timeouts, st.closed_bad, st.open) == (1, 1, 2)


def test_a_caller_that_will_not_wait_still_gets_a_new_connection_for_a_dead_one(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        dead = conn.driver_connection
    dead.kill()
    with pool.acquire(timeout=0) as conn:  # the dead one discarded, a new one opened
        assert conn.driver_connection is not dead


@pytest.mark.parametrize("mode", ["raises", "false"])
def test_ping_hook_that_raises_or_says_no_discards(make_pool: Any, clock: Any, mode: str) -> None:
    def ping(raw: Any) -> bool:
        if mode == "raises":
            raise RuntimeError("no")
        return False

    pool = make_pool(ping=ping, ping_after=1)
    with pool.connection() as conn:
        first = conn.driver_connection
    clock.advance(2)
    with pool.connection() as conn:
        assert conn.driver_connection is not first
    s = pool.stats()
    assert s.ping_failures == 1 and s.closed_bad == 1


def test_default_ping_failure_discards(make_pool: Any, server: fakedb.Server, clock: Any, caplog: Any) -> None:
    pool = make_pool(ping_after=1, name="p")
    with pool.connection() as conn:
        first = conn.driver_connection
    server.ping_error = fakedb.OperationalError("server closed the connection unexpectedly")
    clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
        with pool.connection() as conn:
            second = conn.driver_connection
    server.ping_error = None
    assert second is not first and first.closed
    assert "ping failed" in caplog.text and "'p'" in caplog.text


def test_reset_session_runs_only_on_used_connections(make_pool: Any) -> None:
    pool = make_pool(reset_session=True)
    with pool.connection() as conn:
        raw = conn.driver_connection
        assert raw.resets == 0  # brand new: nothing to reset
        conn.cursor().execute("SET search_path = evil")
    with pool.connection() as conn:
        assert raw.resets == 1
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone() == (None,)  # the previous borrower's setting is gone


def test_configure_runs_again_after_the_drivers_reset(make_pool: Any) -> None:
    # The driver's reset (RESET ALL, COM_RESET_CONNECTION) undoes what
    # configure set, too: the second borrower was on the server's default
    # search_path, and its unqualified tables were other tables.
    def configure(raw: Any) -> None:
        raw.cursor().execute("SET search_path = app")
        raw.commit()

    pool = make_pool(reset_session=True, configure=configure)
    for _ in range(3):
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SHOW search_path")
            assert cur.fetchone() == ("app",)
            cur.execute("SET search_path = evil")  # this borrower's own: gone for the next
    assert pool.stats().created == 1


def test_configure_that_fails_after_the_reset_discards(make_pool: Any, caplog: Any) -> None:
    calls: list[int] = []

    def configure(raw: Any) -> None:
        calls.append(raw.id)
        if raw.resets:
            raise RuntimeError("no such schema")

    pool = make_pool(reset_session=True, configure=configure)
    with pool.connection() as conn:
        first = conn.driver_connection
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"), pool.connection() as conn:
        second = conn.driver_connection
        assert second is not first  # discarded; a new one, configured as new
    assert first.closed and pool.stats().closed_invalid == 1
    assert calls == [first.id, first.id, second.id]
    assert "configure, after reset_session, failed" in caplog.text and "no such schema" in caplog.text


def test_reset_on_return_resets_when_the_connection_comes_back(make_pool: Any) -> None:
    # What the session held goes with the caller: reset at its close(),
    # not when the connection is next handed out (which may be much later).
    def configure(raw: Any) -> None:
        raw.cursor().execute("SET search_path = app")
        raw.commit()

    pool = make_pool(reset_session=True, reset_on="return", configure=configure)
    with pool.connection() as conn:
        raw = conn.driver_connection
        conn.cursor().execute("SET search_path = evil")
    assert raw.resets == 1  # at the return
    assert raw.session == {"search_path": "app"}  # and set up again, as new
    with pool.connection() as conn:
        assert raw.resets == 1  # none at checkout
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone() == ("app",)
    assert raw.resets == 2
    assert pool.stats().created == 1


def test_reset_on_return_leaves_connections_opened_for_nobody_alone(make_pool: Any, server: fakedb.Server) -> None:
    # min_size's connections go to the idle stack through the return path;
    # nobody used their sessions, so there is nothing to reset.
    pool = make_pool(min_size=2, reset_session=True, reset_on="return")
    pool._maintain()
    assert pool.stats().idle == 2
    assert [c.resets for c in server.connections] == [0, 0]
    with pool.connection() as conn:
        raw = conn.driver_connection
    assert raw.resets == 1  # handed out: reset when it came back


@pytest.mark.parametrize("mode", ["raises", "false"])
def test_a_reset_on_return_that_fails_closes_the_connection(make_pool: Any, mode: str) -> None:
    def reset(raw: Any) -> bool:
        if mode == "raises":
            raise RuntimeError("cannot reset")
        return False

    pool = make_pool(reset_session=reset, reset_on="return")
    conn = pool.acquire()
    raw = conn.driver_connection
    conn.close()  # the caller sees nothing of it
    assert raw.closed
    s = pool.stats()
    assert (s.closed_invalid, s.open, s.idle) == (1, 0, 0)


@pytest.mark.parametrize("mode", ["raises", "false"])
def test_reset_session_hook_that_fails_discards(make_pool: Any, mode: str) -> None:
    def reset(raw: Any) -> bool:
        if mode == "raises":
            raise RuntimeError("cannot reset")
        return False

    pool = make_pool(reset_session=reset)
    with pool.connection() as conn:
        first = conn.driver_connection
    with pool.connection() as conn:
        assert conn.driver_connection is not first
    assert pool.stats().closed_invalid == 1


@pytest.mark.parametrize("mode", ["raises", "false"])
def test_is_valid_that_raises_or_says_no_closes_on_return(make_pool: Any, mode: str) -> None:
    def is_valid(raw: Any) -> bool:
        if mode == "raises":
            raise RuntimeError("broken")
        return False

    pool = make_pool(is_valid=is_valid)
    with pool.connection() as conn:
        raw = conn.driver_connection
    assert raw.closed
    s = pool.stats()
    assert s.closed_invalid == 1 and s.idle == 0 and s.open == 0


# -------------------------------------------------- lifetime, idle, jitter


def test_lifetime_expired_connection_is_not_handed_out(make_pool: Any, clock: Any) -> None:
    pool = make_pool(max_lifetime=100, lifetime_jitter=0)
    with pool.connection() as conn:
        first = conn.driver_connection
    clock.advance(99)
    with pool.connection() as conn:
        assert conn.driver_connection is first
    clock.advance(2)
    with pool.connection() as conn:
        assert conn.driver_connection is not first
    assert pool.stats().closed_expired == 1


def test_idle_time_exceeded_connection_is_not_handed_out(make_pool: Any, clock: Any) -> None:
    pool = make_pool(max_idle_time=30)
    with pool.connection() as conn:
        first = conn.driver_connection
    clock.advance(31)
    with pool.connection() as conn:
        assert conn.driver_connection is not first
    assert pool.stats().closed_idle == 1


def test_lifetime_jitter_spreads_expiry_below_max_lifetime(make_pool: Any) -> None:
    pool = make_pool(max_size=50, max_lifetime=100, lifetime_jitter=0.2)
    conns = [pool.acquire() for _ in range(50)]
    lifetimes = [c._rec.expires_at - c._rec.created_at for c in conns]
    assert all(80 <= lt <= 100 for lt in lifetimes)
    assert max(lifetimes) - min(lifetimes) > 5  # not all at once
    for c in conns:
        c.close()


def test_maintenance_closes_expired_idle_and_keeps_min_size(make_pool: Any, clock: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=5, min_size=2, max_idle_time=10, max_lifetime=1000, lifetime_jitter=0)
    pool._maintain()
    assert pool.stats().idle == 2
    first = {c.id for c in server.open_connections}
    clock.advance(11)
    pool._maintain()
    s = pool.stats()
    assert s.closed_idle == 2 and s.idle == 2 and s.open == 2
    assert first.isdisjoint(c.id for c in server.open_connections)


def test_keeping_min_size_backs_off_while_the_server_is_down(
    make_pool: Any, clock: Any, server: fakedb.Server, caplog: Any
) -> None:
    # Each round used to try min_size connects, and warn twice for each:
    # against a server that is down, every second, from every pool.
    attempts: list[int] = []
    server.connect_hook = lambda: attempts.append(1)
    pool = make_pool(max_size=5, min_size=3, maintenance_interval=1.0)
    server.down = True
    caplog.set_level(logging.DEBUG, logger="poolkit.pool")
    warned = lambda: [r for r in caplog.records if r.levelno >= logging.WARNING]  # noqa: E731
    pool._maintain()
    assert len(attempts) == 1  # one attempt, not three
    assert len(warned()) == 2 and "trying again in" in warned()[1].getMessage()
    st = pool.stats()
    assert (st.open, st.opening) == (0, 0)  # the other two slots were given back
    pool._maintain()
    assert len(attempts) == 1  # backing off: 1-2 s after the first failure
    clock.advance(2)
    pool._maintain()
    assert len(attempts) == 2 and len(warned()) == 2  # the second failure is logged at DEBUG
    clock.advance(2)
    pool._maintain()
    assert len(attempts) == 2  # 2-4 s after the second
    server.down = False
    clock.advance(2)
    pool._maintain()
    assert len(attempts) == 5 and pool.stats().idle == 3  # back: all three at once
    clock.advance(1000)
    server.down = True
    pool._maintain()  # the three are idle too long: closed, and reopening fails
    assert len(warned()) == 4  # a new run of failures warns again


def test_a_callers_connect_ends_the_min_size_backoff(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=5, min_size=2, maintenance_interval=1.0)
    server.down = True
    pool._maintain()
    server.down = False
    with pool.connection():  # the server answers a caller
        pass
    pool._maintain()  # and the round keeps min_size at once, backoff or not
    assert pool.stats().idle == 2


def test_maintenance_thread_runs_by_itself(server: fakedb.Server) -> None:
    pool = Pool(server.connect, min_size=2, maintenance_interval=0.02)
    try:
        deadline = time.monotonic() + 5
        while pool.stats().idle < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats().idle == 2
    finally:
        pool.close()
    assert not pool._maintainer.is_alive()


def test_abandoned_pool_is_freed_and_its_maintenance_thread_ends(server: fakedb.Server) -> None:
    """The maintenance thread holds only a weak reference: a pool dropped
    without close() is freed, with its connections, and the thread ends.
    (Its loop once named the pool, and the closure kept it alive for ever.)"""
    pool = Pool(server.connect, min_size=1, maintenance_interval=0.02)
    with pool.connection() as conn:
        conn.cursor().execute("SELECT 1")
    thread = pool._maintainer
    ref = weakref.ref(pool)
    del pool, conn
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:  # a round may hold it for a moment
        gc.collect()
        time.sleep(0.01)
    assert ref() is None
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd")
def test_abandoned_pool_closes_its_idle_connections(tmp_path: Any) -> None:
    """Dropped with the pool, its idle connections are not taken for ones
    dropped while checked out: each copy sent to the (dead) pool's orphans
    made the connection live again, and it was never closed."""
    path = str(tmp_path / "abandoned.db")

    def files_open() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/self/fd/{fd}") == path
        return n

    pool = Pool(lambda: sqlite3.connect(path, check_same_thread=False), max_size=3, maintenance_interval=3600)
    conns = [pool.acquire() for _ in range(3)]
    for conn in conns:
        conn.cursor().execute("SELECT 1")
        conn.close()
    assert files_open() == 3
    del pool, conns, conn
    for _ in range(3):
        gc.collect()
    assert files_open() == 0


# ------------------------------------------------------------ invalidate


def test_invalidate_retires_idle_and_checked_out_connections(make_pool: Any) -> None:
    pool = make_pool(max_size=3)
    a = pool.acquire()
    b = pool.acquire()
    old = {a.driver_connection, b.driver_connection}
    b_raw = b.driver_connection
    b.close()
    pool.invalidate()
    assert b_raw.closed  # idle: closed at once
    assert pool.stats().idle == 0
    a.cursor().execute("SELECT 1")  # the holder keeps using it
    a_raw = a.driver_connection
    a.close()
    assert a_raw.closed  # closed on return, not pooled
    with pool.connection() as conn:
        assert conn.driver_connection not in old
    assert pool.stats().generation == 1


def test_invalidate_during_connect_in_flight_discards_the_new_connection(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=2)
    in_connect = threading.Barrier(2)
    go_on = threading.Event()
    made: list[Any] = []

    def hook() -> None:
        if not made:
            made.append(True)
            in_connect.wait()
            go_on.wait(5)

    server.connect_hook = hook
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    in_connect.wait()  # the connect has started (generation already read)
    pool.invalidate()
    go_on.set()
    t.join()
    assert got[0].driver_connection.id == 2  # connection 1 opened before the invalidate: never handed out
    assert server.connections[0].closed
    assert pool.stats().closed_invalidated == 1
    got[0].close()


def test_invalidate_while_checkout_pings(make_pool: Any, server: fakedb.Server, clock: Any) -> None:
    """invalidate() lands while a checkout is between popping and handing out."""
    in_ping = threading.Barrier(2)
    resume = threading.Event()
    calls: list[int] = []

    def ping(raw: Any) -> bool:
        calls.append(raw.id)
        if len(calls) == 1:
            in_ping.wait()
            resume.wait(5)
        return True

    pool = make_pool(max_size=2, ping=ping, ping_after=1)
    with pool.connection():
        pass
    clock.advance(2)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    in_ping.wait()
    pool.invalidate()
    resume.set()
    t.join()
    assert got[0].driver_connection.id == 2
    assert server.connections[0].closed
    got[0].close()


def test_invalidate_races_with_concurrent_checkout_and_return(make_pool: Any, server: fakedb.Server) -> None:
    """Many rounds of: threads released together by a barrier check out, use
    and return while another thread invalidates. After each invalidate, no
    connection of an older generation is ever handed out."""
    pool = make_pool(max_size=4, timeout=10)
    stop = threading.Event()
    violations: list[str] = []
    barrier = threading.Barrier(5)

    def worker() -> None:
        barrier.wait()
        while not stop.is_set():
            gen_before = pool._generation
            with pool.connection() as conn:
                rec = conn._rec
                if rec.generation < gen_before:
                    violations.append(f"gen {rec.generation} handed out after invalidate to {gen_before}")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    barrier.wait()
    for _ in range(200):
        pool.invalidate()
    stop.set()
    for t in threads:
        t.join()
    assert not violations
    s = pool.stats()
    assert s.generation == 200
    assert s.in_use == 0 and s.created - s.closed == s.open


# ----------------------------------------------------------------- stats


def test_reset_stats_does_not_lose_concurrent_updates(make_pool: Any) -> None:
    pool = make_pool(max_size=4)
    per_thread = 500
    barrier = threading.Barrier(5)
    done = threading.Event()
    resets = 0

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            with pool.connection():
                pass

    def resetter() -> None:
        nonlocal resets
        barrier.wait()
        while not done.is_set():
            pool.reset_stats()
            resets += 1

    # count what was acquired since the *last* reset: run the resetter
    # alongside, stop it, reset once more, then do a known amount of work
    threads = [threading.Thread(target=worker) for _ in range(4)]
    r = threading.Thread(target=resetter)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    r.join()
    assert resets > 0
    pool.reset_stats()
    assert pool.stats().acquired == 0
    barrier2 = threading.Barrier(4)

    def worker2() -> None:
        barrier2.wait()
        for _ in range(per_thread):
            with pool.connection():
                pass

    threads = [threading.Thread(target=worker2) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.stats().acquired == 4 * per_thread  # no increment lost


def test_reset_stats_is_atomic_with_increments(make_pool: Any, monkeypatch: Any) -> None:
    """A reset that lands between another thread's read and write of a
    counter would lose the reset (or the increment). The counters are only
    touched under the lock, so a reset provoked at that exact point waits."""
    pool = make_pool()
    with pool.connection():
        pass
    entered = threading.Event()
    real_lock = pool._lock

    class SlowLock:
        def __enter__(self) -> None:
            real_lock.acquire()
            if threading.current_thread().name == "incrementer":
                entered.set()
                time.sleep(0.05)  # hold the lock: a racing reset must wait

        def __exit__(self, *a: object) -> None:
            real_lock.release()

        def acquire(self, *a: Any, **k: Any) -> bool:
            return real_lock.acquire(*a, **k)

        def release(self) -> None:
            real_lock.release()

    monkeypatch.setattr(pool, "_lock", SlowLock())
    t = threading.Thread(target=pool._count_retry, name="incrementer")
    t.start()
    entered.wait()
    pool.reset_stats()  # must run entirely before or after the increment
    t.join()
    monkeypatch.setattr(pool, "_lock", real_lock)
    assert pool.stats().retries == 0  # the increment came first, the reset after


def test_stats_snapshot_is_frozen_and_complete(make_pool: Any) -> None:
    pool = make_pool(max_size=7)
    s = pool.stats()
    with pytest.raises(Exception):
        s.open = 3  # type: ignore[misc]
    for field in [
        "max_size",
        "open",
        "in_use",
        "idle",
        "waiting",
        "acquired",
        "wait_count",
        "wait_time",
        "timeouts",
        "created",
        "closed",
        "closed_bad",
        "closed_expired",
        "closed_idle",
        "closed_invalidated",
        "closed_invalid",
        "pings",
        "ping_failures",
        "retries",
        "generation",
    ]:
        assert hasattr(s, field), field
    assert s.max_size == 7
    text = s.prometheus()
    assert 'poolkit_open{pool="' in text and "poolkit_acquired_total" in text


def test_export_stats_writes_json_atomically(make_pool: Any, tmp_path: Any, monkeypatch: Any) -> None:
    pool = make_pool(name="exp")
    path = tmp_path / "stats.json"
    pool.export_stats(path)
    assert json.loads(path.read_text())["name"] == "exp"
    # a failure half-way leaves the old file and no temporary behind
    import poolkit.stats as stats_mod

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(stats_mod.os, "replace", boom)
    with pool.connection():
        pass
    with pytest.raises(OSError, match="disk full"):
        pool.export_stats(path)
    assert json.loads(path.read_text())["acquired"] == 0  # the old content
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


# ------------------------------------------------------------ close, resize


def test_close_wakes_waiters_and_closes_connections(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=2)
    held = pool.acquire()
    idle = pool.acquire()
    idle.close()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    held2 = pool.acquire()
    t = threading.Thread(target=waiter)
    t.start()
    while pool.stats().waiting < 1:
        time.sleep(0.001)
    t0 = time.monotonic()
    closer = threading.Thread(target=pool.close, kwargs={"timeout": 5})
    closer.start()
    t.join(5)
    assert isinstance(errors[0], PoolClosed)
    assert time.monotonic() - t0 < 1
    raw = held.driver_connection
    held.close()
    held2.close()
    closer.join(5)
    assert raw.closed
    assert server.open_connections == []
    with pytest.raises(PoolClosed):
        pool.acquire()
    pool.close()  # twice is fine


def test_pool_as_context_manager_closes(server: fakedb.Server) -> None:
    with Pool(server.connect) as pool:
        with pool.connection():
            pass
    assert pool.closed and server.open_connections == []


def test_resize_grows_for_waiters_and_shrinks_idle(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    while pool.stats().waiting < 1:
        time.sleep(0.001)
    pool.resize(2)
    t.join()
    assert got and pool.stats().open == 2
    got[0].close()
    held.close()
    pool.resize(1)
    assert pool.stats().open == 1
    with pytest.raises(ValueError):
        pool.resize(0)


def test_after_shrinking_returns_close_until_the_pool_fits_and_then_stay(make_pool: Any) -> None:
    pool = make_pool(max_size=3)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    pool.resize(1)
    assert pool.stats().open == 3  # all three are out: nothing to close yet
    a.close()
    b.close()
    assert (pool.stats().open, pool.stats().idle) == (1, 0)  # closed on return
    kept = c.driver_connection
    c.close()
    assert (pool.stats().open, pool.stats().idle) == (1, 1)  # fits now: kept
    assert pool._plain_ticket is pool._era  # and returns take the short way again
    with pool.connection() as again:
        assert again.driver_connection is kept
    assert (pool.stats().open, pool.stats().idle) == (1, 1)


@pytest.mark.parametrize(("max_idle", "kept"), [(None, 4), (2, 2)])
def test_max_idle_follows_resize_back_up(make_pool: Any, max_idle: int | None, kept: int) -> None:
    # the default max_idle is max_size, whatever max_size becomes; a given
    # one is capped by max_size while the pool is smaller, and comes back
    pool = make_pool(max_size=2, max_idle=max_idle)
    pool.resize(1)
    pool.resize(4)
    held = [pool.acquire() for _ in range(4)]
    for conn in held:
        conn.close()
    assert (pool.stats().open, pool.stats().idle) == (kept, kept)


def test_max_idle_below_max_size_closes_the_returns_beyond_it(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=3, max_idle=1)
    held = [pool.acquire() for _ in range(3)]
    for conn in held:
        conn.close()
    assert (pool.stats().open, pool.stats().idle) == (1, 1)
    assert len(server.open_connections) == 1


def test_a_returned_connection_is_no_longer_watched_for_leaks(make_pool: Any, clock: Any, caplog: Any) -> None:
    pool = make_pool(leak_timeout=10, name="leaky")
    pool.acquire().close()
    with pool.connection():
        pass
    clock.advance(11)
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
        pool._maintain()
    assert "checked out for" not in caplog.text


# ----------------------------------------------------- leaks, fork safety


def test_leaked_connection_is_logged_with_the_checkout_stack(make_pool: Any, clock: Any, caplog: Any) -> None:
    pool = make_pool(leak_timeout=10, name="leaky")

    def checkout_site() -> Any:
        return pool.acquire()

    conn = checkout_site()
    clock.advance(11)
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
        pool._maintain()
        pool._maintain()  # logged once
    records = [r for r in caplog.records if "checked out for" in r.getMessage()]
    assert len(records) == 1
    assert "checkout_site" in records[0].getMessage()
    conn.close()


def test_a_connection_opened_fresh_for_a_retry_is_leak_tracked_from_its_checkout(
    make_pool: Any, clock: Any, caplog: Any
) -> None:
    # pool.run's last attempt opens a fresh connection (_acquire_fresh), which
    # skips the reuse checks: its lease must still be timed from checkout.
    pool = make_pool(leak_timeout=10, name="leaky")

    def retry_site() -> Any:
        return pool._acquire_fresh(None)

    conn = retry_site()
    clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
        pool._maintain()
        assert "checked out for" not in caplog.text  # 5 s is within leak_timeout
        clock.advance(6)
        pool._maintain()
    assert "checked out for 11.0s" in caplog.text
    assert "retry_site" in caplog.text
    conn.close()


def test_dropped_proxy_is_reclaimed(make_pool: Any, caplog: Any) -> None:
    pool = make_pool(max_size=1)
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")
    raw = conn.driver_connection
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
        del conn
        gc.collect()
        with pool.connection(timeout=2) as again:  # the only slot comes back
            assert again.driver_connection is raw
    assert not raw.in_transaction  # rolled back before reuse
    assert "dropped without being returned" in caplog.text


def _in_child(fn: Any) -> bytes:
    """``fn()`` in a forked child; what it returned (at most 64 bytes)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.write(w, fn())
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 64)
    os.waitpid(pid, 0)
    os.close(r)
    return result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
# forking with the pool's threads running is the point of this test
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_never_uses_or_closes_inherited_connections(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=2)
    held = pool.acquire()
    with pool.connection():
        pass
    parent_raws = {held.driver_connection.id, *(c.id for c in server.open_connections)}

    def child() -> bytes:
        with pool.connection(timeout=2) as conn:
            ok = conn.driver_connection.id not in parent_raws
        held.close()  # returning an inherited connection must not close it
        inherited_open = all(not c.closed for c in server.connections if c.id in parent_raws)
        return b"ok" if ok and inherited_open else b"bad"

    assert _in_child(child) == b"ok"
    assert not held.driver_connection.closed  # the parent's connections are untouched
    held.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_that_drops_an_inherited_proxy_keeps_its_connection_alive(tmp_path: Any) -> None:
    # Finalising a driver connection can send a goodbye on the socket the
    # child shares with its parent: an inherited connection is never let go
    # of in the child, dropped proxy or not.
    class Connection(sqlite3.Connection):  # one that can be watched with a weak reference
        pass

    path = str(tmp_path / "fork.db")
    pool = Pool(lambda: sqlite3.connect(path, check_same_thread=False, factory=Connection), max_size=1)
    held = pool.acquire()
    raw = weakref.ref(held.driver_connection)

    def child() -> bytes:
        nonlocal held
        del held
        gc.collect()
        return b"ok" if raw() is not None else b"finalised"

    assert _in_child(child) == b"ok"
    held.close()
    pool.close()


def test_public_names() -> None:
    for name in poolkit.__all__:
        obj = getattr(poolkit, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert obj.__module__ == "poolkit", name


# ------------------------------------------------------------------ failover


def test_failover_starts_after_a_node_that_is_not_the_leader() -> None:
    a, b, c = fakedb.Server(), fakedb.Server(), fakedb.Server()
    connect = poolkit.failover(a.connect, b.connect, c.connect)
    first = connect()
    assert first.server is a and connect.preferred == 0
    connect.not_leader(first)
    assert connect.preferred == 1
    connect.not_leader(first)  # a second connection of the same node says so too: no further
    assert connect.preferred == 1
    second = connect()
    assert second.server is b
    b.down = True
    connect.not_leader(second)
    assert connect().server is c  # after b, which refused as not the leader (and is down now)
    a.down = c.down = True
    with pytest.raises(fakedb.OperationalError):
        connect()
    with pytest.raises(ValueError, match="at least one"):
        poolkit.failover()
    with pytest.raises(TypeError, match="connect #1 is not callable"):
        poolkit.failover(a.connect, "b")  # type: ignore[arg-type]


@pytest.mark.parametrize("hook_fails", [False, True])
def test_not_leader_is_told_to_the_connect_callable_before_the_pool_invalidates(
    server: fakedb.Server, caplog: Any, hook_fails: bool
) -> None:
    told: list[Any] = []

    class Connect:
        def __call__(self) -> Any:
            return server.connect()

        def not_leader(self, conn: Any) -> None:
            told.append(conn)
            if hook_fails:
                raise RuntimeError("hook broke")

    def classifier(exc: BaseException) -> Classification | None:
        return Classification(Category.NOT_LEADER, "not_leader", exc) if "not leader" in str(exc) else None

    server.execute_errors["INSERT x"] = fakedb.OperationalError("not leader")
    with Pool(Connect(), classifier=classifier, maintenance_interval=3600) as pool:
        with caplog.at_level(logging.WARNING, logger="poolkit.pool"):
            with pool.connection() as conn:
                raw = conn.driver_connection
                with pytest.raises(fakedb.OperationalError):
                    conn.cursor().execute("INSERT x")
        assert told == [raw]
        assert pool.stats().generation == 1  # invalidated all the same
        assert ("not_leader() raised" in caplog.text) is hook_fails


@pytest.mark.parametrize("target", [":memory:", "file"])
def test_a_pool_of_in_memory_sqlite_databases_is_warned_of(tmp_path: Any, caplog: Any, target: str) -> None:
    path = target if target == ":memory:" else str(tmp_path / "t.db")
    with caplog.at_level(logging.WARNING, logger="poolkit.drivers"):
        with Pool(functools.partial(sqlite3.connect, path, check_same_thread=False)) as pool:
            with pool.connection():
                pass
    assert ("in-memory database" in caplog.text) is (target == ":memory:")


def test_a_pool_keeps_its_state_in_slots(make_pool: Any) -> None:
    # on 3.11 an instance with 30 or more attributes in a __dict__ reads each
    # of them twice as slowly, and a pool has about 60: the hot path needs slots
    pool = make_pool()
    assert not hasattr(pool, "__dict__")
    with pytest.raises(AttributeError):
        pool.no_such_option = 1


def test_in_use_follows_every_way_a_connection_comes_and_goes(
    make_pool: Any, server: fakedb.Server, clock: Any
) -> None:
    # in_use is derived (open - opening - closing - idle), not counted: after
    # each path that hands a connection out or lets one go, it must still
    # equal the proxies held, and open must be what is out plus what is idle
    pool = make_pool(max_size=4, max_idle=2, max_idle_time=60)
    held: list[Any] = []

    def check(step: str, **closed: int) -> None:
        st = pool.stats()
        assert (st.in_use, st.open, st.opening) == (len(held), len(held) + st.idle, 0), step
        for reason, n in closed.items():
            assert getattr(st, f"closed_{reason}") == n, (step, reason)

    held += [pool.acquire() for _ in range(4)]
    check("opened")
    for _ in range(3):
        held.pop().close()  # two go idle; the third is more than max_idle keeps
    check("returned", idle=1)
    held.append(pool.acquire())
    check("the hot path")
    server.execute_errors["BOOM"] = fakedb.OperationalError("lost", code=2013)
    with pytest.raises(fakedb.OperationalError):
        held[0].cursor().execute("BOOM")
    held.pop(0).close()
    check("a bad connection returned", bad=1)
    (idle_raw,) = [c for c in server.open_connections if all(h.driver_connection is not c for h in held)]
    idle_raw.kill()
    held.append(pool.acquire())  # the probe sees the hang-up, the ping fails: discarded, another opened
    assert held[-1].driver_connection is not idle_raw
    check("discarded at checkout", bad=2)
    calls = []

    def invalidate_once() -> None:
        if not calls:
            calls.append(1)
            pool.invalidate()

    server.connect_hook = invalidate_once
    held.append(pool.acquire())  # the first connect finishes after an invalidate(): closed, never handed out
    server.connect_hook = None
    check("opened across an invalidate", invalidated=1)
    with pool.connection():
        pass
    pool.invalidate()
    check("invalidated with connections out", invalidated=2)
    while held:
        held.pop().close()  # an older generation: closed on return
    check("returned after the invalidate", invalidated=5)
    for h in [pool.acquire(), pool.acquire()]:
        h.close()
    clock.advance(61)
    pool._maintain()
    check("idle too long", idle=3)
    held.append(pool.acquire())
    for h in [pool.acquire(), pool.acquire()]:
        h.close()
    pool.resize(1)  # the two idle ones go now
    check("shrunk")
    held.pop().close()
    assert pool.stats().idle == 1
    check("returned to a shrunk pool")
    pool.resize(2)
    held.append(pool.acquire())
    with pool.connection():
        pass
    assert pool.stats().idle == 1
    pool.close(timeout=0)  # the idle one is closed now, the one out when returned
    check("closed with one out")
    held.pop().close()
    check("returned to a closed pool")


# --------------------------------------------------------- the return path


def test_a_setting_changed_through_the_proxy_is_undone_on_return(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        raw = conn.driver_connection
        conn.autocommit = True
        conn.autocommit = False
        conn.autocommit = True  # the value saved is the one before the first change
        assert raw.autocommit is True and conn.autocommit is True
    assert raw.autocommit is False
    (rec,) = pool._idle
    assert rec.saved is None and rec.ticket is pool._plain_ticket  # the plain return path again
    with pytest.raises(ConnectionReturned):
        conn.autocommit = True
    with pool.connection() as again:
        assert again.driver_connection is raw and again.autocommit is False


def test_a_setting_that_cannot_be_restored_closes_the_connection(make_pool: Any, monkeypatch: Any) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        raw = conn.driver_connection
        driver = pool._driver
        real = driver.set_setting
        calls: list[Any] = []

        def set_setting(conn: Any, name: str, value: Any) -> None:
            calls.append(value)
            if len(calls) > 1:  # the restore
                raise fakedb.OperationalError("server closed the connection unexpectedly", code=2013)
            real(conn, name, value)

        monkeypatch.setattr(driver, "set_setting", set_setting)
        conn.autocommit = True
    assert calls == [True, False]
    assert raw.closed and pool.stats().closed_bad == 1


def test_a_connection_an_error_showed_bad_is_closed_on_return_though_it_reads_idle(
    make_pool: Any, server: fakedb.Server
) -> None:
    # the driver still says IDLE: only the pool's own mark says the
    # connection is unusable, and a plain return must not overlook it
    pool = make_pool(max_size=2)
    server.execute_errors["BOOM"] = fakedb.OperationalError("lost", code=2013)
    conn = pool.acquire()
    raw = conn.driver_connection
    with pytest.raises(fakedb.OperationalError):
        conn.cursor().execute("BOOM")
    conn.close()
    assert raw.closed
    st = pool.stats()
    assert (st.idle, st.closed_bad) == (0, 1)
    with pool.connection() as again:
        assert again.driver_connection is not raw


@pytest.mark.parametrize("event", ["invalidate", "close"])
def test_a_return_in_flight_when_the_pool_is_invalidated_or_closed_is_not_kept(
    make_pool: Any, monkeypatch: Any, event: str
) -> None:
    """invalidate() or close() lands while a return is between its first
    look at the connection and taking the lock: the connection was checked
    out at that moment, so it must be closed, never put back on the stack."""
    pool = make_pool(max_size=2)
    conn = pool.acquire()
    raw = conn.driver_connection
    in_state = threading.Barrier(2)
    resume = threading.Event()
    driver = pool._driver
    read_state = driver.transaction_state

    def paused(c: Any) -> int:
        in_state.wait(5)
        resume.wait(5)
        return read_state(c)

    monkeypatch.setattr(driver, "transaction_state", paused)  # shared by pools: undone below
    t = threading.Thread(target=conn.close)
    t.start()
    in_state.wait(5)  # the return has passed its check outside the lock
    if event == "invalidate":
        pool.invalidate()
    else:
        pool.close(timeout=0)
    resume.set()
    t.join(5)
    monkeypatch.undo()
    assert raw.closed
    st = pool.stats()
    assert st.idle == 0
    assert (st.closed_invalidated if event == "invalidate" else st.closed) == 1
    if event == "invalidate":
        with pool.connection() as again:
            assert again.driver_connection is not raw


@pytest.mark.parametrize(
    "case", ["plain", "in a transaction", "is_valid", "bad", "invalidated", "max_idle", "leaks", "a setting changed"]
)
def test_only_a_plain_return_takes_the_plain_path(
    make_pool: Any, server: fakedb.Server, monkeypatch: Any, case: str
) -> None:
    # PooledConnection.close() settles the plain return with one identity
    # test (the connection's ticket); everything else goes on in
    # Pool._checkin. Each condition the ticket stands for is tried here.
    kw: dict[str, Any] = {"max_size": 2}
    if case == "is_valid":
        kw["is_valid"] = lambda raw: True
    elif case == "max_idle":
        kw["max_idle"] = 1
    elif case == "leaks":
        kw["leak_timeout"] = 60
    pool = make_pool(**kw)
    conn = pool.acquire()
    if case == "in a transaction":
        conn.cursor().execute("INSERT x")
    elif case == "bad":
        server.execute_errors["BOOM"] = fakedb.OperationalError("lost", code=2013)
        with pytest.raises(fakedb.OperationalError):
            conn.cursor().execute("BOOM")
    elif case == "invalidated":
        pool.invalidate()
    elif case == "a setting changed":
        conn.autocommit = True
    slow: list[Any] = []
    checkin = Pool._checkin
    monkeypatch.setattr(Pool, "_checkin", lambda self, rec, state: (slow.append(rec), checkin(self, rec, state)))
    conn.close()
    assert bool(slow) is (case != "plain")
    assert pool.stats().idle == (0 if case in ("bad", "invalidated") else 1)


def test_pymysql_advice_names_a_tls_context_built_for_nothing() -> None:
    """The rule behind the PyMySQL advice, on unconnected connections: only
    its default ("preferred") TLS on a connection that did not use TLS."""
    pymysql = pytest.importorskip("pymysql")
    from poolkit.drivers.pymysql import DRIVER

    def conn(**kw: Any) -> Any:
        return pymysql.connect(host="127.0.0.1", defer_connect=True, **kw)

    assert "ssl_disabled=True" in (DRIVER.advice(conn()) or "")
    assert DRIVER.advice(conn(ssl_disabled=True)) is None
    assert DRIVER.advice(conn(ssl_verify_cert=False, ssl_ca=None, ssl_verify_identity=True)) is None  # required
    secure = conn()
    secure._secure = True  # what PyMySQL sets once the server took TLS
    assert DRIVER.advice(secure) is None
