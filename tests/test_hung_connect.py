"""A connect that hangs does not hold its caller past the caller's timeout.

A server that accepted the TCP connection and never answers (or a proxy in
front of a dead one), a SYN lost to a host that is gone, which Linux
retries for two minutes: a driver's connect waits in C, and Python cannot
interrupt it. So a connect that can hang runs in a thread of its own; the
caller waits for it no longer than its timeout, and the connect goes on.
What it makes then is the pool's: a connection joins it (the next waiter,
or the idle stack), a failure gives the slot back. Nothing is lost, and no
more than ``max_size`` connections are ever open or being opened.

The hangs are provoked at the exact point: the fake server's connect hook
blocks on an event the test sets; on the real servers, a chaos proxy
accepts and never answers."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from typing import Any

import fakedb
import pytest
from pooltest import Interrupted, consistent, settled

from poolkit import Pool, PoolClosed, PoolTimeout


class Hang:
    """The fake server's connect hook: after the next ``after`` connects,
    ``n`` connects block until :meth:`release`; ``entered`` counts those
    that started."""

    def __init__(self, server: fakedb.Server, n: int = 1, after: int = 0) -> None:
        self.after = after
        self.left = n
        self.entered = 0
        self.threads: list[threading.Thread] = []
        self.go = threading.Event()
        self._lock = threading.Lock()
        server.connect_hook = self

    def __call__(self) -> None:
        with self._lock:
            if self.after:
                self.after -= 1
                return
            if self.left == 0:
                return
            self.left -= 1
            self.entered += 1
            self.threads.append(threading.current_thread())
        assert self.go.wait(10), "the test never released the hung connect"

    def release(self) -> None:
        self.go.set()


@pytest.mark.timing
def test_a_caller_waits_for_a_hung_connect_no_longer_than_its_timeout(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    hang = Hang(server)
    pool = make_pool(max_size=2, timeout=5)
    start = time.monotonic()
    with pytest.raises(PoolTimeout, match="the connect has not returned"):
        pool.acquire(timeout=0.3)
    assert 0.25 < time.monotonic() - start < 0.8
    st = pool.stats()
    assert (st.opening, st.timeouts, st.connects_abandoned, st.acquired) == (1, 1, 1, 0), st
    assert hang.threads[0] is not threading.current_thread()
    # the connect ends: its connection is the pool's, idle, and the next
    # caller gets it without a connect of its own
    hang.release()
    settled(pool)
    consistent(pool)
    assert (pool.stats().idle, pool.stats().acquired) == (1, 0)
    with pool.connection(timeout=1) as conn:
        assert conn.driver_connection.id == 1
    assert len(server.connections) == 1


def test_a_hung_connect_that_fails_gives_its_slot_to_the_caller_behind(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    # max_size=1: the slot of the connect its caller gave up on is the only
    # one. The caller who came next waits for it, and gets it once the
    # connect fails: a connect error is not the next caller's problem.
    hang = Hang(server)
    server.connect_errors.append(fakedb.ProgrammingError("bad password"))  # not retried
    pool = make_pool(max_size=1, timeout=5)
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.1)
    got: list[Any] = []
    behind = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    behind.start()
    deadline = time.monotonic() + 5
    while pool.stats().waiting != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    hang.release()
    behind.join(5)
    (conn,) = got
    assert conn.driver_connection.id == 1  # the first connect failed and made none
    conn.close()
    consistent(pool)
    assert (pool.stats().open, pool.stats().connect_errors) == (1, 1)


def test_a_connect_that_ends_as_its_caller_gives_up_is_the_callers(
    make_pool: Any, server: fakedb.Server, monkeypatch: Any
) -> None:
    # The caller's wait times out; before it leaves, the connect ends (the
    # test makes it, at that exact point). The connection is the caller's:
    # handed out, not raised past, and not left for the pool.
    hang = Hang(server)
    pool = make_pool(max_size=1, timeout=5)
    leave = Pool._leave

    def leave_after_the_connect_ended(self: Pool, job: Any, *, timed_out: bool) -> bool:
        hang.release()
        deadline = time.monotonic() + 5
        while not job.finished:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return leave(self, job, timed_out=timed_out)

    monkeypatch.setattr(Pool, "_leave", leave_after_the_connect_ended)
    conn = pool.acquire(timeout=0.05)
    assert conn.driver_connection.id == 1
    conn.close()
    consistent(pool)
    st = pool.stats()
    assert (st.timeouts, st.connects_abandoned, st.acquired) == (0, 0, 1), st


def test_a_connect_with_no_thread_to_run_in_gives_its_slot_back(
    make_pool: Any, server: fakedb.Server, monkeypatch: Any
) -> None:
    # The process is out of threads: the caller gets the error, and the slot
    # it reserved is free again; no connect was started, so none abandoned.
    pool = make_pool(max_size=1)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pool.acquire(timeout=1)
    monkeypatch.undo()
    st = pool.stats()
    assert (st.connects_abandoned, st.timeouts) == (0, 0), st
    consistent(pool)
    with pool.connection(timeout=1):
        pass
    assert server.connections[0].id == 1 and len(server.connections) == 1


@pytest.mark.timing
def test_closing_the_pool_wakes_a_caller_waiting_for_its_connect(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    hang = Hang(server)
    pool = make_pool(max_size=1, timeout=10)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            pool.acquire()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    deadline = time.monotonic() + 5
    while not hang.entered:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    start = time.monotonic()
    pool.close(timeout=0)
    t.join(5)
    assert time.monotonic() - start < 1.0  # not at its 10 s timeout
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed), errors
    # the connect ends after the close: what it made is closed, not kept
    hang.release()
    settled(pool)
    assert server.open_connections == []
    assert pool.stats().open == 0


def test_a_caller_interrupted_while_its_connect_hangs_leaves_the_connection_to_the_pool(
    make_pool: Any, server: fakedb.Server, signal_main: Any, no_orphans: Any
) -> None:
    # Ctrl-C while the connect hangs: the main thread waits in a lock of the
    # pool's, not in the driver, so the interruption lands at once; the
    # connect goes on, and its connection joins the pool.
    hang = Hang(server)
    pool = make_pool(max_size=1, timeout=10)
    signal_main(lambda: hang.entered == 1)
    start = time.monotonic()
    with pytest.raises(Interrupted):
        pool.acquire()
    assert time.monotonic() - start < 2.0
    st = pool.stats()
    assert (st.timeouts, st.connects_abandoned) == (0, 1), st  # interrupted, not timed out
    hang.release()
    settled(pool)
    consistent(pool)
    assert pool.stats().idle == 1


@pytest.mark.timing
def test_a_caller_past_its_deadline_waits_for_its_new_connect_at_most_ping_timeout(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    # Its idle connection failed a slow ping, which took the caller past its
    # deadline: it opens a new one in the slot freed, and waits for that
    # connect no longer than ping_timeout, the bound of the check it replaces.
    pool = make_pool(max_size=1, ping_after=0, ping=lambda conn: time.sleep(0.2) or False, ping_timeout=0.3)
    pool.acquire().close()
    hang = Hang(server)
    start = time.monotonic()
    with pytest.raises(PoolTimeout, match="the connect has not returned"):
        pool.acquire(timeout=0.1)
    assert 0.45 < time.monotonic() - start < 1.0  # 0.2 s ping, then 0.3 s
    hang.release()
    settled(pool)
    consistent(pool)


def test_embedded_connects_and_unbounded_waits_connect_in_the_callers_thread(
    make_pool: Any, server: fakedb.Server, tmp_path: Any
) -> None:
    # No thread where a connect cannot hang (sqlite3 has no server) or the
    # caller would wait for it without limit anyway. (The pool learns its
    # driver from the first connection: that connect has a thread.)
    where: list[threading.Thread] = []

    def connect() -> sqlite3.Connection:
        where.append(threading.current_thread())
        return sqlite3.connect(tmp_path / "db", check_same_thread=False)

    with Pool(connect, max_size=3) as pool:
        held = [pool.acquire(), pool.acquire(), pool.acquire()]
        for c in held:
            c.close()
    assert where[0].name.startswith("poolkit-connect-")
    assert where[1:] == [threading.current_thread()] * 2

    seen: list[threading.Thread] = []
    server.connect_hook = lambda: seen.append(threading.current_thread())
    pool = make_pool(max_size=2)
    held = [pool.acquire(timeout=math.inf), pool.acquire(timeout=math.inf)]
    assert seen == [threading.current_thread()] * 2
    for c in held:
        c.close()


def test_no_more_than_max_size_connects_run_while_callers_give_up(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    # Callers who gave up on hung connects leave them running: each holds
    # its slot until it ends, so a storm of timeouts never runs more than
    # max_size connects, and the callers after them wait in line. (One
    # connection opened first: the pool knows its driver, one whose
    # connects can hang.)
    pool = make_pool(max_size=3)
    held = pool.acquire()
    hang = Hang(server, n=10)
    for _ in range(6):
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0.05)
    assert hang.entered == 2
    st = pool.stats()
    assert (st.opening, st.timeouts, st.in_use) == (2, 6, 1), st
    hang.release()
    settled(pool)
    consistent(pool, held=1)
    assert pool.stats().idle == 2
    assert len(server.connections) == 3
    held.close()


def test_a_min_size_connect_that_hangs_holds_up_maintenance_no_longer_than_an_interval(
    make_pool: Any, server: fakedb.Server, clock: Any, no_orphans: Any
) -> None:
    # min_size=2: the maintenance round's first connect goes through, the
    # second hangs. The rounds go on meanwhile (here: the first connection
    # outlives its max_idle_time and is closed), and open no more than
    # min_size: the hung connect holds its slot.
    hang = Hang(server, n=10, after=1)
    pool = make_pool(min_size=2, max_size=4, max_idle_time=60, maintenance_interval=0.05)
    deadline = time.monotonic() + 5
    while not (hang.entered and pool.stats().idle == 1):
        assert time.monotonic() < deadline, pool.stats()
        time.sleep(0.002)
    clock.advance(61)
    while pool.stats().closed_idle != 1:
        assert time.monotonic() < deadline, f"maintenance stopped while a connect hung: {pool.stats()}"
        time.sleep(0.002)
    st = pool.stats()
    assert st.open + st.opening <= 2 and hang.entered <= 2, st
    hang.release()
    deadline = time.monotonic() + 5
    while pool.stats().idle != 2:
        assert time.monotonic() < deadline, pool.stats()
        time.sleep(0.002)
    consistent(pool)
    assert pool.stats().open == 2


@pytest.mark.integration
@pytest.mark.timing
def test_a_connect_hung_on_a_real_server_holds_its_caller_no_longer_than_its_timeout(
    proxied: Any, no_orphans: Any
) -> None:
    # The server (a proxy in front of it) accepts and never answers. The
    # driver's connect_timeout is 2 s; the caller's timeout, 0.3 s, is what
    # it waits. Once the server answers again, the pool has the connection.
    _backend, proxy, connect = proxied
    proxy.blackhole()
    pool = Pool(connect, max_size=1, timeout=10, name="hung")
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout, match="the connect has not returned"):
            pool.acquire(timeout=0.3)
        assert time.monotonic() - start < 1.0
        assert pool.stats().opening == 1
        proxy.heal()
        settled(pool, timeout=10)  # the hung attempt times out (2 s), the next one connects
        consistent(pool)
        with pool.connection(timeout=5) as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        consistent(pool)
        assert pool.stats().open == 1
    finally:
        pool.close(timeout=1)
