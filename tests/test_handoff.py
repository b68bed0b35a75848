"""Who gets a returned connection while others wait: the oldest waiter, or
(for a bounded number of times, while that waiter is young) the caller that
comes straight back for another. Deterministic: the threads are lined up
with events and the pool's own counters, never with sleeps that hope."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import poolkit.pool as pool_mod
from poolkit import Pool, PoolTimeout


def wait_until(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


class Waiter(threading.Thread):
    """A caller that waits in line, then holds what it got until told."""

    def __init__(self, pool: Pool, timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.pool = pool
        self.timeout = timeout
        self.got: Any = None
        self.error: BaseException | None = None
        self.started = self.served_at = 0.0
        self.done = threading.Event()
        self.let_go = threading.Event()

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            self.got = self.pool.acquire(timeout=self.timeout)
            self.served_at = time.monotonic()
        except BaseException as exc:
            self.error = exc
        self.done.set()
        if self.got is not None:
            self.let_go.wait(10)
            self.got.close()

    def enqueue(self) -> Waiter:
        before = self.pool.stats().waiting
        self.start()
        wait_until(lambda: self.pool.stats().waiting == before + 1)
        return self


def in_turn(pool: Pool, held: Any) -> Any:
    """``held``'s connection, handed to this thread through the queue (another
    thread returns it while this one waits), so that its turn starts now."""
    closer = threading.Thread(target=lambda: (wait_until(lambda: pool.stats().waiting == 1), held.close()))
    closer.start()
    conn = pool.acquire(timeout=5)
    closer.join(5)
    return conn


def looping_pool(make_pool: Any, monkeypatch: Any, **kw: Any) -> tuple[Pool, Any, Waiter]:
    """A pool of 2 where callers "come straight back" (the thresholds are made
    60 s, so no scheduler hiccup can spoil it): one waiter
    holds a connection handed to it, a second waiter (returned) waits young,
    and the caller holds the other connection (returned), handed to it."""
    monkeypatch.setattr(pool_mod, "_CAME_BACK", 60.0)
    monkeypatch.setattr(pool_mod, "_QUICK", 60.0)
    monkeypatch.setattr(pool_mod, "_TURN", 60.0)
    pool = make_pool(max_size=2, **kw)
    a, b = pool.acquire(), pool.acquire()
    first = Waiter(pool).enqueue()  # nothing seen yet: this return is a plain hand-off
    a.close()
    assert first.done.wait(5) and first.got is not None
    b = in_turn(pool, b)
    second = Waiter(pool).enqueue()  # arrives right after a return: callers loop
    return pool, b, second


def test_a_caller_that_comes_straight_back_reuses_its_connection_a_bounded_number_of_times(
    make_pool: Any, monkeypatch: Any
) -> None:
    pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=30, handoff_streak=3)
    raw = conn.driver_connection
    for _ in range(3):
        conn.close()  # the waiter is young and callers loop: kept for us
        conn = pool.acquire(timeout=1)
        assert conn.driver_connection is raw
        assert not waiter.done.is_set()
    conn.close()  # the fourth return in a row goes to the waiter
    assert waiter.done.wait(5) and waiter.got.driver_connection is raw
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)  # and the caller now waits its turn


def test_a_turn_holds_about_turn_seconds_of_work_whatever_the_streak(make_pool: Any, monkeypatch: Any) -> None:
    """Units of work that are quick enough to keep (under ``_QUICK``) but not
    free: a turn ends once its reuses times their average length reach
    ``_TURN`` (made 0.1 s here, with 20 ms units: within about 10 reuses)."""
    pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=30, handoff_streak=10**9)
    monkeypatch.setattr(pool_mod, "_TURN", 0.1)
    raw = conn.driver_connection
    reuses = 0
    while True:
        time.sleep(0.02)  # a unit of work
        conn.close()
        if waiter.done.wait(0.2):
            break
        reuses += 1
        assert reuses < 15, "the turn did not end"
        conn = pool.acquire(timeout=1)
        assert conn.driver_connection is raw
    assert reuses >= 3, f"the turn ended after {reuses} reuses, before 0.1 s of work"
    assert waiter.got.driver_connection is raw
    waiter.let_go.set()
    waiter.join(5)


def test_slow_units_of_work_end_the_reuse_whatever_the_streak(make_pool: Any, monkeypatch: Any) -> None:
    """A caller keeps reusing a connection only while units of work are quick
    on average (under ``_QUICK``, made 30 ms here), however many reuses
    ``handoff_streak`` would still allow: once they turn slow (100 ms each),
    returns go to the waiter within a few of them."""
    monkeypatch.setattr(pool_mod, "_CAME_BACK", 60.0)
    monkeypatch.setattr(pool_mod, "_QUICK", 0.03)
    monkeypatch.setattr(pool_mod, "_TURN", 60.0)
    pool = make_pool(max_size=2, handoff_after=30, handoff_streak=10**9)
    a, b = pool.acquire(), pool.acquire()
    first = Waiter(pool).enqueue()
    a.close()
    assert first.done.wait(5)
    conn = in_turn(pool, b)
    raw = conn.driver_connection
    waiter = Waiter(pool).enqueue()
    conn.close()  # quick: kept
    conn = pool.acquire(timeout=1)
    assert conn.driver_connection is raw and not waiter.done.is_set()
    for _ in range(6):
        time.sleep(0.1)  # a slow unit of work
        conn.close()
        if waiter.done.wait(0.5):
            break
        conn = pool.acquire(timeout=1)  # still kept: the average is catching up
    assert waiter.done.is_set(), "slow units of work kept the waiter waiting"
    assert waiter.got.driver_connection is raw
    for w in (first, waiter):
        w.let_go.set()
        w.join(5)


def test_handoff_streak_zero_is_strict_first_in_first_out(make_pool: Any, monkeypatch: Any) -> None:
    _pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=30, handoff_streak=0)
    raw = conn.driver_connection
    conn.close()
    assert waiter.done.wait(5) and waiter.got.driver_connection is raw


def test_handoff_after_zero_is_strict_first_in_first_out(make_pool: Any, monkeypatch: Any) -> None:
    _pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=0)
    conn.close()
    assert waiter.done.wait(5) and waiter.got is not None


def test_a_caller_that_does_not_come_straight_back_hands_off_at_once(make_pool: Any) -> None:
    """The real threshold: a caller that returns a connection and does other
    work first never makes a waiter wait for nothing."""
    pool = make_pool(max_size=1, handoff_after=30, handoff_streak=100)
    for _ in range(3):
        conn = pool.acquire()
        waiter = Waiter(pool).enqueue()
        time.sleep(0.01)  # "work": far longer than coming straight back
        returned = time.monotonic()
        conn.close()
        assert waiter.done.wait(5) and waiter.got is not None
        assert waiter.served_at - returned < 1.0  # not the 30 s window
        waiter.let_go.set()
        waiter.join(5)


def test_the_oldest_waiter_is_served_first_once_its_window_is_over(make_pool: Any, monkeypatch: Any) -> None:
    pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=0.2, handoff_streak=10**9)
    start = time.monotonic()
    laps = 0
    while not waiter.done.is_set() and time.monotonic() - start < 5:
        conn.close()
        try:
            conn = pool.acquire(timeout=0.01)
        except PoolTimeout:
            break
        laps += 1
    assert waiter.done.wait(5) and waiter.got is not None, "the oldest waiter starved"
    assert laps > 1  # the caller did reuse its connection while the waiter was young
    assert 0.15 <= waiter.served_at - waiter.started < 2.0


def test_a_connection_left_idle_reaches_the_waiter_at_the_end_of_its_window(make_pool: Any, monkeypatch: Any) -> None:
    """Kept for a caller that then did not come back: the waiter wakes by
    itself when its window ends and takes it, long before its own timeout."""
    pool, conn, waiter = looping_pool(make_pool, monkeypatch, handoff_after=0.3, handoff_streak=10**9)
    conn.close()
    assert pool.stats().idle == 1  # kept for us, and we walk away
    assert waiter.done.wait(5) and waiter.got is not None
    assert 0.25 <= waiter.served_at - waiter.started < 2.0  # its 0.3 s window, not its 10 s timeout
    s = pool.stats()
    assert s.idle == 0 and s.waiting == 0 and s.in_use == 2


def test_a_connection_left_idle_goes_to_the_waiter_at_the_next_return(make_pool: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(pool_mod, "_CAME_BACK", 60.0)
    monkeypatch.setattr(pool_mod, "_QUICK", 60.0)
    pool = make_pool(max_size=3, handoff_after=30, handoff_streak=10**9)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    first = Waiter(pool).enqueue()
    a.close()  # plain hand-off
    assert first.done.wait(5)
    b, c = in_turn(pool, b), in_turn(pool, c)
    second = Waiter(pool).enqueue()
    third = Waiter(pool).enqueue()
    raw_b = b.driver_connection
    b.close()  # kept idle for a caller that does not come back
    assert pool.stats().idle == 1 and not second.done.is_set()
    c.close()  # any later return first serves the left-over one, oldest waiter first
    assert second.done.wait(5) and second.got.driver_connection is raw_b
    assert pool.stats().idle == 1 and not third.done.is_set()  # c itself is kept for its caller
    for w in (first, second, third):
        w.let_go.set()
    for w in (first, second, third):
        w.join(5)
    s = pool.stats()
    assert s.in_use == 0 and s.waiting == 0 and s.idle == s.open


def test_sixteen_looping_callers_on_four_connections_are_all_served(make_pool: Any) -> None:
    """With the default hand-off settings, no caller starves: every one of 16
    threads in a tight loop on 4 connections gets a fair share (a loose bound;
    the benchmark runner measures fairness properly)."""
    pool = make_pool(max_size=4)
    stop = threading.Event()
    barrier = threading.Barrier(17)
    ops = [0] * 16

    def loop(i: int) -> None:
        barrier.wait()
        while not stop.is_set():
            with pool.connection(timeout=10):
                pass
            ops[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert min(ops) > 0.2 * (sum(ops) / 16), ops
    s = pool.stats()
    assert s.in_use == 0 and s.waiting == 0 and s.open <= 4
