"""The pool's own waits for a server end within ``ping_timeout``.

Returning a connection with a transaction open makes the pool roll it back;
a checkout with ``reset_session`` resets the session. Both wait for the
server in a driver call with no timeout of its own: psycopg waits for a
server that stopped answering until TCP gives up (about 15 minutes),
PyMySQL for ever. The caller's ``conn.close()``, the end of its ``with``
block, would hang as long. So the pool notes the deadline, and its
maintenance thread cuts a connection whose server has not answered by
then (its socket is shut down): the driver call fails at once, and the
connection is discarded, its slot free again.

The fake server's rollback and reset wait on the connection's socket, as a
real driver's would; on the real servers, a chaos proxy stops answering."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import fakedb
import pytest
from pooltest import consistent

from poolkit import Pool
from poolkit.testing import Faulty


def closing_in_thread(conn: Any) -> threading.Thread:
    """``conn.close()`` in a thread of its own, started; it may hang."""
    t = threading.Thread(target=conn.close, daemon=True)
    t.start()
    return t


def waiting_for(server_conn: Any, t: threading.Thread) -> None:
    """Until the fake connection is waiting for its server's answer."""
    deadline = time.monotonic() + 5
    while not server_conn._client.gettimeout():  # set by wait_for_answer
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.001)


@pytest.mark.parametrize("faulty", [False, True], ids=["plain", "faulty"])
def test_a_rollback_on_return_that_gets_no_answer_is_cut_at_ping_timeout(
    make_pool: Any, server: fakedb.Server, clock: Any, caplog: Any, faulty: bool
) -> None:
    # poolkit.testing.Faulty's connections probe through alive() (so that
    # its "probe" faults apply), and are cut on their real socket all the same
    caplog.set_level(logging.WARNING, logger="poolkit.pool")
    connect = Faulty(server.connect).connect if faulty else server.connect
    pool = make_pool(max_size=1, ping_timeout=2.0, connect=connect)
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")  # a transaction open
    raw = conn.driver_connection
    if faulty:
        raw = raw._faulty_inner
    server.rollback_hangs = True
    t = closing_in_thread(conn)
    waiting_for(raw, t)
    pool._maintain()  # before the deadline: nothing to cut
    t.join(0.2)
    assert t.is_alive()
    clock.advance(2.0)
    pool._maintain()
    t.join(5)
    assert not t.is_alive(), "the return still waits for the server"
    assert raw.closed
    assert "did not answer the pool's rollback, reset or ping within ping_timeout (2s)" in caplog.text
    st = pool.stats()
    assert (st.closed_bad, st.cuts) == (1, 1), st
    consistent(pool)
    server.rollback_hangs = False
    with pool.connection(timeout=1) as again:  # the slot is free
        assert again.driver_connection is not raw


def test_a_reset_on_return_that_gets_no_answer_is_cut(make_pool: Any, server: fakedb.Server, clock: Any) -> None:
    pool = make_pool(max_size=1, reset_session=True, reset_on="return", ping_timeout=1.0)
    conn = pool.acquire()
    raw = conn.driver_connection
    server.reset_hangs = True
    t = threading.Thread(target=conn.close, daemon=True)  # the caller's close() waits for the reset
    t.start()
    waiting_for(raw, t)
    server.reset_hangs = False
    clock.advance(1.0)
    pool._maintain()
    t.join(5)
    assert not t.is_alive() and raw.closed
    assert pool.stats().closed_bad == 1
    consistent(pool)
    with pool.connection(timeout=1) as again:  # the slot is free
        assert again.driver_connection is not raw


def test_a_reset_at_checkout_that_gets_no_answer_is_cut_and_the_caller_gets_another(
    make_pool: Any, server: fakedb.Server, clock: Any
) -> None:
    pool = make_pool(max_size=1, reset_session=True, ping_timeout=1.0)
    pool.acquire().close()  # used once: the next checkout resets it
    first = server.connections[0]
    server.reset_hangs = True
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)), daemon=True)
    t.start()
    waiting_for(first, t)
    server.reset_hangs = False
    clock.advance(1.0)
    pool._maintain()
    t.join(5)
    (conn,) = got
    assert conn.driver_connection is not first  # a new one, opened in the slot freed
    assert first.closed
    conn.close()
    assert pool.stats().closed_bad == 1
    consistent(pool)


def test_a_ping_without_a_deadline_of_its_own_is_cut_at_ping_timeout(
    make_pool: Any, server: fakedb.Server, clock: Any
) -> None:
    # A driver whose ping cannot be bounded (the generic one; here the
    # fake's): the cut bounds it.
    pool = make_pool(max_size=1, ping_after=0, ping_timeout=1.0)
    pool.acquire().close()
    first = server.connections[0]
    server.ping_hangs = True
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)), daemon=True)
    t.start()
    waiting_for(first, t)
    clock.advance(1.0)
    pool._maintain()
    t.join(5)
    (conn,) = got
    assert conn.driver_connection is not first and first.closed
    conn.close()
    st = pool.stats()
    assert (st.closed_bad, st.ping_failures) == (1, 1), st
    consistent(pool)


def test_a_connection_cut_just_as_its_rollback_ends_is_not_kept(
    make_pool: Any, server: fakedb.Server, clock: Any
) -> None:
    # The answer comes as the deadline passes: the maintenance round cuts
    # the socket, then the rollback returns as if all were well. The socket
    # is shut down all the same, so the connection must not go back idle.
    pool = make_pool(max_size=1, ping_timeout=1.0)
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")
    raw = conn.driver_connection
    real_rollback = raw.rollback

    def rollback_that_ends_as_it_is_cut() -> None:
        clock.advance(1.0)
        pool._maintain()  # the round that cuts it, at this exact point
        real_rollback()

    raw.rollback = rollback_that_ends_as_it_is_cut
    conn.close()
    assert raw.closed
    st = pool.stats()
    assert (st.closed_bad, st.idle) == (1, 0), st
    consistent(pool)


def test_a_rollback_that_gets_its_answer_in_time_is_not_cut(make_pool: Any, server: fakedb.Server, clock: Any) -> None:
    pool = make_pool(max_size=1, ping_timeout=1.0)
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")
    raw = conn.driver_connection
    conn.close()
    clock.advance(5.0)
    pool._maintain()  # nothing guarded any more
    assert not raw.closed and raw.rollbacks == 1
    assert pool.stats().idle == 1 and pool.stats().cuts == 0 and not pool._guarded


@pytest.mark.parametrize("retired_by", ["close", "invalidate"])
def test_a_connection_returned_only_to_be_closed_is_not_rolled_back_first(
    make_pool: Any, server: fakedb.Server, retired_by: str
) -> None:
    # Returned after close() or invalidate(), the connection is closed, and
    # its server rolls back what is open when it closes. A rollback first
    # would be one more wait for a server that may not answer, and after
    # close() no maintenance round is left to cut it.
    pool = make_pool(max_size=1)
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")  # a transaction open
    raw = conn.driver_connection
    server.rollback_hangs = True
    if retired_by == "close":
        pool.close(timeout=0)
    else:
        pool.invalidate()
    t = closing_in_thread(conn)
    t.join(2)
    assert not t.is_alive(), "the return waits for a rollback of a connection it closes anyway"
    assert raw.closed and raw.rollbacks == 0
    st = pool.stats()
    assert (st.closed, st.closed_bad, st.closed_invalidated, st.in_use) == (
        1,
        0,
        int(retired_by == "invalidate"),
        0,
    ), st
    consistent(pool)


@pytest.mark.timing
def test_the_cut_comes_at_the_deadline_not_at_the_next_round(server: fakedb.Server, monkeypatch: Any) -> None:
    # The wait is guarded just after a maintenance round: its deadline
    # (0.6 s) falls between the next round (0.5 s) and the one after (1.0 s).
    # The thread wakes for the deadline itself, not only for its rounds.
    rounds = threading.Event()
    maintain = Pool._maintain

    def counted(self: Pool) -> Any:
        try:
            return maintain(self)
        finally:
            rounds.set()

    monkeypatch.setattr(Pool, "_maintain", counted)
    pool = Pool(server.connect, max_size=1, ping_timeout=0.6, maintenance_interval=0.5, name="on-time")
    try:
        conn = pool.acquire()
        conn.cursor().execute("INSERT 1")
        raw = conn.driver_connection
        server.rollback_hangs = True
        rounds.clear()
        assert rounds.wait(5), "no maintenance round"
        start = time.monotonic()
        t = closing_in_thread(conn)
        t.join(5)
        took = time.monotonic() - start
        assert not t.is_alive(), "the return still waits for the server"
        assert 0.6 <= took < 0.85, took  # the next round would cut it at 1.0 s
        assert raw.closed and pool.stats().cuts == 1
    finally:
        server.rollback_hangs = False
        pool.close(timeout=1)


@pytest.mark.timing
def test_a_return_hung_when_the_pool_is_closed_is_still_cut(server: fakedb.Server) -> None:
    # The rollback began before close(): the maintenance thread, stopped by
    # close(), goes on cutting until no connection is guarded, and close()
    # returns once the connection is back, not at its own timeout.
    pool = Pool(server.connect, max_size=1, ping_timeout=0.3, maintenance_interval=0.05, name="closing")
    conn = pool.acquire()
    conn.cursor().execute("INSERT 1")
    raw = conn.driver_connection
    server.rollback_hangs = True
    t = closing_in_thread(conn)
    waiting_for(raw, t)
    start = time.monotonic()
    pool.close(timeout=3)
    took = time.monotonic() - start
    t.join(1)
    assert not t.is_alive(), "the return still waits for the server"
    assert took < 1.5, took  # the cut at 0.3 s, a round of 0.05 s, slack; not close()'s 3 s
    assert raw.closed
    st = pool.stats()
    assert (st.cuts, st.closed_bad, st.in_use) == (1, 1, 0), st
    assert pool._maintainer is not None
    pool._maintainer.join(2)  # nothing left to cut: it ends
    assert not pool._maintainer.is_alive(), "the maintenance thread of a closed pool does not end"


@pytest.mark.integration
@pytest.mark.timing
def test_a_return_to_a_server_that_stopped_answering_ends_within_ping_timeout(proxied: Any) -> None:
    # A real driver rolls back on a connection whose server (a proxy in
    # front of it) stopped answering: without the cut, close() hangs.
    backend, proxy, connect = proxied
    pool = Pool(connect, max_size=1, ping_timeout=0.3, maintenance_interval=0.05, name="silent")
    try:
        conn = pool.acquire()
        cur = conn.cursor()
        if backend.name == "mariadb":
            cur.execute("BEGIN")
        cur.execute("SELECT 1")
        cur.fetchall()
        proxy.blackhole()
        start = time.monotonic()
        t = closing_in_thread(conn)
        t.join(5)
        assert not t.is_alive(), "the return still waits for the server"
        assert time.monotonic() - start < 1.5  # 0.3 s, a round of 0.05 s, slack
        assert pool.stats().closed_bad == 1
        proxy.heal()
        with pool.connection(timeout=5) as again:
            cur = again.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        consistent(pool)
    finally:
        pool.close(timeout=1)


@pytest.mark.timing
def test_a_wait_guarded_while_the_thread_sleeps_a_long_interval_is_cut_on_time(server: fakedb.Server) -> None:
    # With maintenance_interval longer than ping_timeout, the thread slept
    # through the deadline of a wait guarded after it went to sleep: the cut
    # came at its next round, 30 s on. The guarded wait now wakes it.
    pool = Pool(server.connect, max_size=1, ping_timeout=0.5, maintenance_interval=30, name="long-interval")
    try:
        conn = pool.acquire()
        conn.cursor().execute("INSERT 1")
        raw = conn.driver_connection
        server.rollback_hangs = True
        start = time.monotonic()
        t = closing_in_thread(conn)
        t.join(5)
        took = time.monotonic() - start
        assert not t.is_alive(), "the return still waits for the server"
        assert 0.5 <= took < 1.5, took
        assert raw.closed and pool.stats().cuts == 1
    finally:
        server.rollback_hangs = False
        pool.close(timeout=1)


@pytest.mark.timing
def test_a_wait_guarded_while_the_thread_works_out_its_next_wake_is_cut_on_time(
    server: fakedb.Server, monkeypatch: Any
) -> None:
    # The race: the thread has done its round and worked out when to wake
    # (the next round, 1 s on) but not yet gone to sleep, and a wait is
    # guarded then, due in 0.3 s. It must still be cut at 0.3 s, not 1 s.
    in_round, go_on = threading.Event(), threading.Event()
    maintain = Pool._maintain

    def paused(self: Pool) -> Any:
        due = maintain(self)
        if not in_round.is_set():
            in_round.set()
            go_on.wait(5)  # held here, between working out its wake and sleeping
        return due

    monkeypatch.setattr(Pool, "_maintain", paused)
    pool = Pool(server.connect, max_size=1, ping_timeout=0.3, maintenance_interval=1.0, name="race")
    try:
        conn = pool.acquire()
        conn.cursor().execute("INSERT 1")
        raw = conn.driver_connection
        server.rollback_hangs = True
        assert in_round.wait(5), "no maintenance round"
        start = time.monotonic()
        t = closing_in_thread(conn)
        waiting_for(raw, t)  # guarded now, while the thread is held
        go_on.set()
        t.join(5)
        took = time.monotonic() - start
        assert not t.is_alive(), "the return still waits for the server"
        assert 0.3 <= took < 0.8, took  # the next round would cut it at 1 s
        assert raw.closed and pool.stats().cuts == 1
    finally:
        go_on.set()
        server.rollback_hangs = False
        pool.close(timeout=1)


def test_a_begin_to_a_server_that_stopped_answering_is_cut_and_the_work_runs_on_another(proxied: Any) -> None:
    # run()'s BEGIN (PostgreSQL) or SET TRANSACTION (MySQL) is the pool's own
    # statement. Its reply never comes back (the proxy sends it to the server
    # and drops the answer); the BEGIN waited until TCP gave up, or PyMySQL's
    # read_timeout. Cut at ping_timeout, it is retried at once on a new
    # connection, nothing of the work having been sent.
    backend, proxy, connect = proxied
    pool = Pool(connect, max_size=1, ping_timeout=0.3, maintenance_interval=0.05, name="silent-begin")
    try:
        pool.acquire().close()
        marker = b"BEGIN ISOLATION LEVEL" if backend.name == "postgresql" else b"SET TRANSACTION"
        proxy.cut_reply_after(marker, grace=30)  # the connection is reset only long after
        calls = 0

        def work(conn: Any) -> int:
            nonlocal calls
            calls += 1
            cur = conn.cursor()
            cur.execute("SELECT 41 + 1")
            return int(cur.fetchone()[0])

        result: list[Any] = []
        start = time.monotonic()
        t = threading.Thread(
            target=lambda: result.append(pool.run(work, isolation_level="READ COMMITTED")), daemon=True
        )
        t.start()
        t.join(10)
        took = time.monotonic() - start
        assert not t.is_alive(), "run() still waits for the BEGIN"
        assert result == [42] and calls == 1
        assert took < 1.5, took  # 0.3 s and a new connection (PyMySQL's read_timeout is 2 s)
        st = pool.stats()
        assert (st.cuts, st.closed_bad, st.retries) == (1, 1, 1), st
        consistent(pool)
    finally:
        proxy.heal()
        pool.close(timeout=1)
