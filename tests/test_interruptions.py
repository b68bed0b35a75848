"""An exception that is not an error, raised wherever the caller happens to
be: KeyboardInterrupt (Ctrl-C, or any signal handler that raises), a gevent
``Timeout`` inside a hung connect or a wait for a connection. Wherever it
lands, the pool must not lose what it was doing: a slot reserved for a
connect, a connection or a slot handed to a waiter that is no longer there,
a connection half-way through a ping or a rollback. Lost, they are lost for
good: the pool serves fewer callers until, at zero, it serves none.

The interruptions are provoked at the exact point: raised by a hook the pool
calls, or by a real signal sent to the main thread once it waits in line
(its handler runs inside the blocked lock acquire, as Ctrl-C's does)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import fakedb
import pytest
from pooltest import Interrupted, consistent, settled

from poolkit import Pool, failover


def waiting(pool: Pool, n: int) -> Callable[[], bool]:
    return lambda: pool.stats().waiting == n


class Waiter:
    """Another caller, in a thread, waiting for a connection from ``pool``."""

    def __init__(self, pool: Pool, timeout: float = 3.0) -> None:
        self.got: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(pool, timeout), daemon=True)
        self.thread.start()

    def _run(self, pool: Pool, timeout: float) -> None:
        try:
            self.got = pool.acquire(timeout)
        except BaseException as exc:
            self.error = exc

    def result(self) -> Any:
        self.thread.join(10)
        assert self.error is None, f"the next caller was not served: {self.error!r}"
        assert self.got is not None
        return self.got


# ---------------------------------------------------------- waiting in line


@pytest.mark.parametrize("meanwhile", ["nothing", "a connection", "a slot"])
def test_a_waiter_interrupted_leaves_the_line_and_passes_on_what_it_was_given(
    make_pool: Any, server: fakedb.Server, signal_main: Any, no_orphans: Any, meanwhile: str
) -> None:
    # The main thread waits for the only connection, with another caller in
    # line behind it, and is interrupted. Meanwhile (in the signal handler,
    # before the interruption reaches the pool) the connection may have been
    # handed to it, or, retired on return, left it a slot to open one in.
    # Either must go to the next caller: left to a waiter that is gone, it
    # would be lost with the caller behind starved.
    pool = make_pool(max_size=1, handoff_after=0, timeout=5)
    held = pool.acquire()
    behind: list[Waiter] = []

    def then() -> None:
        if meanwhile == "a connection":
            held.close()  # to the oldest waiter: the one being interrupted
        elif meanwhile == "a slot":
            pool.invalidate()
            held.close()  # retired; its slot goes to the oldest waiter

    def ready() -> bool:
        if not behind and pool.stats().waiting == 1:
            behind.append(Waiter(pool))
        return pool.stats().waiting == 2

    signal_main(ready, then)
    start = time.monotonic()
    with pytest.raises(Interrupted):
        pool.acquire()
    assert time.monotonic() - start < 4  # interrupted, not timed out
    if meanwhile == "nothing":
        held.close()  # goes to the caller behind, not to the one that left
    conn = behind[0].result()
    consistent(pool, held=1)
    assert pool.stats().open == 1
    conn.close()
    consistent(pool)


def test_an_interrupted_waiter_leaves_a_returned_connection_idle(
    make_pool: Any, signal_main: Any, no_orphans: Any
) -> None:
    pool = make_pool(max_size=1, handoff_after=0, timeout=5)
    held = pool.acquire()
    signal_main(waiting(pool, 1))
    with pytest.raises(Interrupted):
        pool.acquire()
    assert pool.stats().waiting == 0
    raw = held.driver_connection
    held.close()
    assert pool.stats().idle == 1  # not handed to the waiter that left
    with pool.connection(timeout=0) as conn:
        assert conn.driver_connection is raw
    consistent(pool)


# --------------------------------------------------------------- connecting


@pytest.mark.parametrize("where", ["connect", "configure", "backoff"])
def test_a_connect_interrupted_gives_its_slot_to_the_next_caller(
    make_pool: Any, server: fakedb.Server, no_orphans: Any, where: str
) -> None:
    # max_size=1: the slot the interrupted connect held is the only one. A
    # caller who came meanwhile waits for it, and must get it.
    behind: list[Waiter] = []
    calls: list[int] = []

    def interrupt(*args: Any) -> None:
        if calls:
            return
        calls.append(1)
        pool = pools[0]
        behind.append(Waiter(pool))
        deadline = time.monotonic() + 5
        while pool.stats().waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        raise Interrupted

    pools: list[Pool] = []
    if where == "connect":
        server.connect_hook = interrupt  # inside the driver's connect
        pools.append(make_pool(max_size=1, timeout=5))
    elif where == "configure":
        pools.append(make_pool(max_size=1, timeout=5, configure=interrupt))
    else:  # in the wait between two connect attempts
        server.connect_errors.append(fakedb.OperationalError("connection refused", code=2003))
        pools.append(make_pool(max_size=1, timeout=5))

        class InterruptingStop(threading.Event):
            def wait(self, timeout: float | None = None) -> bool:
                interrupt()
                return False

        real_stop = pools[0]._stop
        pools[0]._stop = InterruptingStop()
    pool = pools[0]
    with pytest.raises(Interrupted):
        pool.acquire()
    if where == "backoff":
        pool._stop = real_stop  # the one the maintenance thread waits on
    conn = behind[0].result()
    # the connection opened before the interruption (configure) was closed
    assert [c.id for c in server.open_connections] == [conn.driver_connection.id]
    conn.close()
    consistent(pool)
    assert pool.stats().open == 1


@pytest.mark.integration
def test_a_connect_hung_on_a_real_server_and_interrupted_gives_its_slot_back(
    proxied: Any, signal_main: Any, no_orphans: Any
) -> None:
    # Ctrl-C (a real signal) while the driver's connect waits for a server
    # that accepted the TCP connection and never answers: the caller stops
    # at once; the connect goes on in its thread (see test_hung_connect),
    # and the pool's only slot must be free again once the server answers.
    _backend, proxy, connect = proxied
    proxy.blackhole()
    pool = Pool(connect, max_size=1, timeout=10, name="interrupted")
    try:
        signal_main(lambda: proxy.accepted >= 1)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            pool.acquire()
        assert time.monotonic() - start < 1.5  # during the connect, not after its 2 s timeout
        proxy.heal()
        settled(pool, timeout=10)  # the connect ends: it times out, or gets through
        consistent(pool)
        with pool.connection(timeout=5) as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        consistent(pool)
        assert pool.stats().open == 1
    finally:
        pool.close(timeout=1)


# ----------------------------------------------------- checkout and return


@pytest.mark.parametrize("hook", ["ping", "reset_session"])
def test_a_checkout_interrupted_in_a_hook_discards_the_connection(
    make_pool: Any, server: fakedb.Server, clock: Any, no_orphans: Any, hook: str
) -> None:
    # A ping cut off half-way leaves the connection mid-conversation: it is
    # closed, and its slot freed, before the interruption goes on.
    armed: list[int] = []

    def interrupting(conn: Any) -> None:
        if armed:
            raise Interrupted

    pool = make_pool(max_size=1, **{hook: interrupting})
    with pool.connection():
        pass
    (raw,) = server.open_connections
    armed.append(1)
    clock.advance(31)  # past ping_after
    with pytest.raises(Interrupted):
        pool.acquire(timeout=1)
    assert raw.closed
    consistent(pool)
    assert (pool.stats().open, pool.stats().closed_bad, pool.stats().acquired) == (0, 1, 1)
    armed.clear()
    with pool.connection(timeout=1) as conn:
        assert conn.driver_connection is not raw


@pytest.mark.parametrize("where", ["rollback", "is_valid"])
def test_a_return_interrupted_closes_the_connection(
    make_pool: Any, server: fakedb.Server, no_orphans: Any, where: str
) -> None:
    armed: list[int] = []

    def is_valid(conn: Any) -> bool:
        if armed:
            raise Interrupted
        return True

    pool = make_pool(max_size=1, is_valid=is_valid if where == "is_valid" else None)
    conn = pool.acquire()
    raw = conn.driver_connection
    if where == "rollback":
        conn.cursor().execute("INSERT 1")  # a transaction open: the return rolls it back

        def rollback() -> None:
            raise Interrupted

        raw.rollback = rollback
    else:
        armed.append(1)
    with pytest.raises(Interrupted):
        conn.close()
    assert raw.closed  # its state is unknown: closed, not kept
    consistent(pool)
    assert (pool.stats().open, pool.stats().closed_bad) == (0, 1)
    armed.clear()
    with pool.connection(timeout=1) as again:
        assert again.driver_connection is not raw


# ------------------------------------------------------------------ closing


def interrupt_first_close(server: fakedb.Server) -> list[Any]:
    """The first of the open connections to be closed is interrupted in its
    close (and stays open); the others close normally. Returns them."""
    raws = server.open_connections
    interrupted: list[Any] = []
    for raw in raws:

        def close(raw: Any = raw, real: Any = raw.close) -> None:
            if not interrupted:
                interrupted.append(raw)
                raise Interrupted
            real()

        raw.close = close
    return raws


@pytest.mark.parametrize("action", ["invalidate", "close"])
def test_an_interrupted_close_strands_no_other_connection(
    make_pool: Any, server: fakedb.Server, no_orphans: Any, action: str
) -> None:
    pool = make_pool(max_size=3)
    conns = [pool.acquire() for _ in range(3)]
    for c in conns:
        c.close()
    raws = interrupt_first_close(server)
    with pytest.raises(Interrupted):
        getattr(pool, action)()
    assert sum(r.closed for r in raws) == 2  # the other two were closed all the same
    st = pool.stats()
    assert (st.open, st.opening, st.in_use, st.idle, st.closed) == (0, 0, 0, 0, 3)
    if action == "invalidate":  # every slot is free again
        held = [pool.acquire(timeout=1) for _ in range(3)]
        consistent(pool, held=3)
        for c in held:
            c.close()


def test_a_fresh_connection_whose_victims_close_is_interrupted_gives_the_slot_back(
    make_pool: Any, server: fakedb.Server, no_orphans: Any
) -> None:
    # The last attempt of pool.run opens a fresh connection in the slot of
    # the oldest idle one, which it closes first.
    pool = make_pool(max_size=1)
    with pool.connection():
        pass
    interrupt_first_close(server)
    with pytest.raises(Interrupted):
        pool._acquire_fresh(1.0)
    consistent(pool)
    assert pool.stats().open == 0
    with pool.connection(timeout=1):
        pass
    consistent(pool)


def test_a_failover_connect_interrupted_in_its_open_closes_the_connection(
    server: fakedb.Server, monkeypatch: Any
) -> None:
    # poolkit.failover makes a lazy driver meet its server (Driver.open);
    # cut short there, the connection it made is closed, not left behind
    def interrupted_open(self: Any, conn: Any) -> None:
        raise Interrupted

    monkeypatch.setattr(fakedb.FakeDriver, "open", interrupted_open)
    connect = failover(server.connect)
    with pytest.raises(Interrupted):
        connect()
    (made,) = server.connections
    assert made.closed
