"""Through the chaos proxy, on PostgreSQL and MariaDB: the faults people meet
in production, on the real servers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from poolkit import AmbiguousCommitError, Category, Pool, PoolTimeout, Retry, classify

pytestmark = pytest.mark.integration

FAST = Retry(attempts=30, deadline=15, initial_backoff=0.01, max_backoff=0.2)


def count(backend: Any, table: str) -> int:
    return int(backend.execute(f"SELECT count(*) FROM {table}")[0][0])


def test_server_restart_under_16_readers(proxied: Any) -> None:
    _backend, proxy, connect = proxied
    pool = Pool(connect, max_size=8, timeout=15, retry=FAST)
    stop = threading.Event()
    errors: list[BaseException] = []
    last_ok = [0.0] * 16
    barrier = threading.Barrier(17)

    def read(conn: Any) -> Any:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        return cur.fetchall()

    def reader(i: int) -> None:
        barrier.wait()
        while not stop.is_set():
            try:
                pool.run(read, idempotent=True)
                last_ok[i] = time.monotonic()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(0.3)
    proxy.refuse()
    proxy.reset_all()  # the "restart": every connection reset, no new one accepted
    time.sleep(0.5)
    proxy.accept()
    back = time.monotonic()
    deadline = back + 10
    while min(last_ok) < back and time.monotonic() < deadline:
        time.sleep(0.01)
    recovered = max(last_ok) and min(last_ok) - back
    stop.set()
    for t in threads:
        t.join(30)
    pool.close()
    assert not errors, errors[:3]  # no error reached a caller
    assert min(last_ok) >= back, "some reader never got through after the server came back"
    assert recovered < 1.0, f"recovered {recovered:.2f}s after the proxy came back"


def test_reply_to_a_non_idempotent_insert_is_cut(proxied: Any, table: str) -> None:
    backend, proxy, connect = proxied
    pool = Pool(connect, max_size=2, retry=FAST)
    calls = 0

    def insert(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'cut')")

    with pool.connection() as c:  # open the connection before arming the cut
        c.cursor().execute("SELECT 1")
    proxy.cut_reply_after(b"INSERT INTO")
    with pytest.raises(Exception) as info:
        pool.run(insert)
    pool.close()
    assert classify(info.value).category is Category.BAD_CONNECTION, info.value
    assert calls == 1  # sent once, not retried
    assert count(backend, table) <= 1


def test_reply_to_commit_is_cut(proxied: Any, table: str) -> None:
    backend, proxy, connect = proxied
    pool = Pool(connect, max_size=2, retry=FAST)
    calls = 0

    def insert(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'commit cut')")
        proxy.cut_reply_after(b"COMMIT")

    with pytest.raises(AmbiguousCommitError):
        pool.run(insert)
    pool.close()
    assert calls == 1
    assert count(backend, table) <= 1  # never two (the server did commit it: 1)


def test_blackholed_server_gives_up_within_the_timeouts(proxied: Any) -> None:
    _backend, proxy, connect = proxied
    pool = Pool(connect, max_size=2, timeout=2, ping_after=0, ping_timeout=0.5, retry=False)
    try:
        with pool.connection() as c:
            c.cursor().execute("SELECT 1")
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            with pool.connection() as c:
                c.cursor().execute("SELECT 1")
        elapsed = time.monotonic() - t0
        # the ping gives up after 0.5 s, then connects (2 s connect_timeout each) until the 2 s timeout
        assert elapsed < 0.5 + 2 + 2 + 0.5, elapsed
        s = pool.stats()
        assert s.ping_failures == 1 and s.closed_bad == 1
    finally:
        proxy.heal()
        pool.close(timeout=1)


def test_latency_and_jitter_alone_never_make_a_connection_bad(proxied: Any) -> None:
    _backend, proxy, connect = proxied
    proxy.latency(0.01, jitter=0.02)
    pool = Pool(connect, max_size=3, ping_after=0, retry=False)
    errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(15):
            try:
                with pool.connection() as c:
                    cur = c.cursor()
                    cur.execute("SELECT 1")
                    cur.fetchall()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s = pool.stats()
    pool.close()
    assert not errors, errors[:3]
    assert s.closed_bad == 0 and s.ping_failures == 0
    assert s.pings > 0  # every checkout pinged through the slow link
