"""poolkit.testing.Faulty, and the races it lets the suite provoke on purpose."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from typing import Any

import fakedb
import pytest

import poolkit
from poolkit import Category, Pool, PoolClosed, PoolTimeout
from poolkit.testing import Delay, Faulty, Hang, Raise, eof, reset


@pytest.fixture
def faulty(tmp_path: Any) -> Faulty:
    return Faulty(sqlite3.connect, str(tmp_path / "f.db"), check_same_thread=False)


def test_raise_at_a_point_with_a_count(faulty: Faulty) -> None:
    faulty.inject("execute", Raise(reset), count=2)
    conn = faulty.connect()
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            conn.execute("SELECT 1")
    assert conn.execute("SELECT 1").fetchall() == [(1,)]
    assert faulty.fired["execute"] == 2


def test_probability_is_reproducible_with_a_seed(tmp_path: Any) -> None:
    def run(seed: int) -> list[bool]:
        f = Faulty(sqlite3.connect, ":memory:")
        f.inject("execute", Raise(eof), probability=0.3, seed=seed)
        c = f.connect()
        out = []
        for _ in range(50):
            try:
                c.execute("SELECT 1")
                out.append(True)
            except EOFError:
                out.append(False)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 5 < run(7).count(False) < 30


def test_delay_and_hang(faulty: Faulty) -> None:
    faulty.inject("commit", Delay(0.05))
    conn = faulty.connect()
    t0 = time.monotonic()
    conn.commit()
    assert time.monotonic() - t0 >= 0.05
    hang = Hang(timeout=5)
    faulty.inject("connect", hang, count=1)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            faulty.connect()
        except TimeoutError as exc:
            errors.append(exc)

    t = threading.Thread(target=connect)
    t.start()
    hang.wait_reached()
    assert t.is_alive()  # hangs until released
    hang.release()
    t.join(5)
    assert errors and "no answer" in str(errors[0])


def test_pause_a_thread_at_an_exact_point(faulty: Faulty) -> None:
    pool = Pool(faulty.connect, max_size=1)
    try:
        with pool.connection() as c:
            c.execute("CREATE TABLE t (x INT)")
            c.commit()
        pause = faulty.pause_at("commit")
        done = threading.Event()

        def writer() -> None:
            with pool.connection() as c:
                c.execute("INSERT INTO t VALUES (1)")
                c.commit()
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        pause.wait_reached()  # the writer is inside commit(), before the driver's
        assert not done.is_set() and pool.stats().in_use == 1
        pause.release()
        t.join(5)
        assert done.is_set()
    finally:
        pool.close()


def test_probe_fault_makes_the_pool_discard(faulty: Faulty) -> None:
    pool = Pool(faulty.connect, max_size=1, ping=False)
    try:
        with pool.connection() as c:
            first = c.driver_connection
        faulty.inject("probe", Raise(eof), count=1)
        with pool.connection() as c:
            assert c.driver_connection is not first
        assert pool.stats().closed_bad == 1
    finally:
        pool.close()


def test_wrapped_connections_keep_their_driver(faulty: Faulty) -> None:
    pool = Pool(faulty.connect, max_size=1)
    try:
        with pool.connection() as c:
            c.execute("SELECT 1")
            assert pool._driver.transaction_state(c.driver_connection) == 0
        with pytest.raises(ValueError, match="check_same_thread"):
            Pool(Faulty(sqlite3.connect, ":memory:").connect).acquire()
    finally:
        pool.close()


def test_bad_injections_are_refused(faulty: Faulty) -> None:
    with pytest.raises(ValueError, match="unknown injection point"):
        faulty.inject("comit", Delay(0))
    with pytest.raises(TypeError, match="Fault"):
        faulty.inject("commit", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probability"):
        faulty.inject("commit", Delay(0), probability=2)
    with pytest.raises(TypeError):
        Faulty(5)  # type: ignore[arg-type]


# ------------------------------------------------------------ provoked races


@pytest.mark.parametrize(
    ("options", "timeout"),
    [
        # no window: the one timed wait is the caller's timeout
        ({"handoff_after": 0}, 1),
        # young for 30 s, but every return is a hand-off: the timed wait that
        # "times out" is the wake at the end of the window, then the long one
        ({"handoff_after": 30, "handoff_streak": 0}, 60),
    ],
    ids=["at-timeout", "at-window-end"],
)
def test_waiter_timing_out_as_a_connection_is_handed_to_it(
    make_pool: Any, monkeypatch: Any, options: dict[str, Any], timeout: float
) -> None:
    """The hand-off and the end of a timed wait land at the same instant: the
    waiter's wait returns "timed out" only after the releasing thread handed
    it the connection. The connection must not be lost."""
    import poolkit.pool as pool_mod

    handed = threading.Event()

    class RacyLock:
        def __init__(self) -> None:
            self._lock = threading.Lock()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            if blocking and timeout == -1:
                return self._lock.acquire()  # the constructor takes it at once
            handed.wait(5)  # "time out" right after the hand-off, every time
            return False

        def release(self) -> None:
            handed.set()

    real_waiter = pool_mod._Waiter

    class RacyWaiter(real_waiter):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.lock = RacyLock()
            self.lock.acquire()

    monkeypatch.setattr(pool_mod, "_Waiter", RacyWaiter)
    pool = make_pool(max_size=1, **options)
    held = pool.acquire()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=timeout)))
    t.start()
    while pool.stats().waiting < 1:
        time.sleep(0.001)
    held.close()
    t.join(5)
    assert got, "the connection handed over at the timeout was lost"
    got[0].close()
    s = pool.stats()
    assert s.idle == 1 and s.in_use == 0 and s.waiting == 0 and s.open == 1


def test_maintenance_while_connections_close_concurrently(server: fakedb.Server, clock: Any) -> None:
    pool = Pool(server.connect, max_size=6, max_idle_time=5, clock=clock, maintenance_interval=3600)
    stop = threading.Event()
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)

    def churn() -> None:
        barrier.wait()
        while not stop.is_set():
            try:
                with pool.connection(timeout=5):
                    pass
                clock.advance(1)
            except BaseException as exc:
                errors.append(exc)

    def maintain() -> None:
        barrier.wait()
        while not stop.is_set():
            pool._maintain()

    threads = [threading.Thread(target=churn) for _ in range(3)] + [threading.Thread(target=maintain)]
    for t in threads:
        t.start()
    barrier.wait()
    for _ in range(50):
        pool.invalidate()
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(10)
    pool.close()
    assert not errors, errors[:3]
    s = pool.stats()
    assert s.created - s.closed == s.open == 0
    assert server.open_connections == []


def test_close_against_everything(server: fakedb.Server) -> None:
    pool = Pool(server.connect, max_size=4, timeout=5)
    barrier = threading.Barrier(9)
    unexpected: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        while True:
            try:
                with pool.connection() as c:
                    c.cursor().execute("SELECT 1")
            except PoolClosed:
                return
            except BaseException as exc:
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(0.05)
    pool.close(timeout=5)
    for t in threads:
        t.join(10)
    assert not unexpected, unexpected[:3]
    assert server.open_connections == []
    assert pool.stats().open == 0 and pool.stats().in_use == 0


# ------------------------------------------------------------------- soak


@pytest.mark.soak
def test_soak_100_threads_random_faults(server: fakedb.Server) -> None:
    """100 threads, max_size=10, many checkouts with random faults. Open never
    exceeds max_size, nothing leaks, the counters add up exactly. CI runs a
    shortened form; POOLKIT_SOAK_CHECKOUTS=100000 runs the full one."""
    total = int(os.environ.get("POOLKIT_SOAK_CHECKOUTS", "20000"))
    faulty = Faulty(server.connect)
    faulty.inject("execute", Raise(lambda: fakedb.OperationalError("lost", code=2013)), probability=0.01, seed=1)
    faulty.inject("probe", Raise(eof), probability=0.01)
    faulty.inject("connect", Raise(lambda: fakedb.OperationalError("refused")), probability=0.05)
    pool = Pool(faulty.connect, max_size=10, timeout=60, ping=False)
    per_thread = total // 100
    made = [0] * 100
    errors: list[BaseException] = []
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(server.open_connections))
            time.sleep(0.001)

    def worker(i: int) -> None:
        rnd = random.Random(i)
        for _ in range(per_thread):
            try:
                conn = pool.acquire()
            except PoolTimeout as exc:
                errors.append(exc)
                continue
            made[i] += 1
            try:
                conn.cursor().execute("SELECT 1" if rnd.random() < 0.5 else "UPDATE x")
            except fakedb.OperationalError:
                assert poolkit.classify(fakedb.OperationalError("lost", code=2013)).category is Category.BAD_CONNECTION
            finally:
                conn.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    stop.set()
    watcher.join()
    s = pool.stats()
    assert not errors, errors[:3]
    assert peak[0] <= 10
    assert s.acquired == sum(made) == per_thread * 100
    assert s.in_use == 0 and s.waiting == 0
    assert s.created - s.closed == s.open == len(server.open_connections)
    assert s.closed_bad > 0  # the faults did happen
    pool.close()
    assert server.open_connections == []
