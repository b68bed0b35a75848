from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fakedb
from pooltest import Interrupted

from poolkit import Pool
from poolkit.pool import _ALL_POOLS
from poolkit.testing import ChaosProxy

IN_CI = os.environ.get("CI", "").lower() == "true"


def need_server(what: str, exc: BaseException | None = None) -> None:
    """A server the test needs is not there: skip locally, fail under CI."""
    msg = f"{what} is not reachable" + (f": {exc!r}" if exc else "")
    if IN_CI:
        pytest.fail(msg + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(msg)


class Clock:
    """An injected clock that tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on, and with it the hot path's reading of it in each
        pool it drives, as the pool's maintenance thread would have read it
        as the time went by (see Pool._tick_clock; tests of the ticks
        themselves move ``now`` by hand)."""
        with self.lock:
            self.now += seconds
        for pool in list(_ALL_POOLS):
            if pool._clock is self:
                pool._tick_clock()


@pytest.fixture
def retry_waits(monkeypatch: Any, caplog: Any) -> Any:
    """tenacity's jittered wait pinned to the top of its range, so the wait it
    picks is known exactly; returns a function giving the waits before each
    retry as ``logger`` logged them (pool.run: poolkit.retry; the SQLAlchemy
    helper: poolkit.sqlalchemy). The test sets caplog's level."""
    import random

    monkeypatch.setattr(random, "uniform", lambda low, high: high)

    def waits(logger: str) -> list[float]:
        return [r.args[-1] for r in caplog.records if r.name == logger and "retrying in" in r.msg]

    return waits


@pytest.fixture
def server() -> fakedb.Server:
    return fakedb.Server()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_pool(server: fakedb.Server, clock: Clock) -> Any:
    pools: list[Pool] = []

    def make(**kw: Any) -> Pool:
        kw.setdefault("clock", clock)
        kw.setdefault("maintenance_interval", 3600.0)  # tests call _maintain() themselves
        pool = Pool(kw.pop("connect", server.connect), **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close(timeout=1.0)


# ------------------------------------------------------------ real servers

import backends  # noqa: E402

_started = False


def _open_backend(name: str, tmp_path: Any) -> backends.Backend:
    global _started
    if name == "sqlite":
        return backends.sqlite(str(tmp_path / "test.db"))
    factory = backends.postgresql if name == "postgresql" else backends.mariadb
    try:
        return factory()
    except ImportError as exc:
        need_server(f"{name} driver", exc)
    except Exception as first:
        if not _started:
            _started = True
            backends.start_servers()
            try:
                return factory()
            except Exception as exc:
                need_server(name, exc)
        need_server(name, first)
    raise AssertionError("unreachable")


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def backend(request: Any, tmp_path: Any) -> Any:
    b = _open_backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture(params=["postgresql", "mariadb"])
def net_backend(request: Any, tmp_path: Any) -> Any:
    """The backends with a server that can kill a connection."""
    b = _open_backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture
def pg(tmp_path: Any) -> Any:
    b = _open_backend("postgresql", tmp_path)
    yield b
    b.close()


@pytest.fixture
def maria(tmp_path: Any) -> Any:
    b = _open_backend("mariadb", tmp_path)
    yield b
    b.close()


@pytest.fixture
def sqlite_backend(tmp_path: Any) -> Any:
    b = _open_backend("sqlite", tmp_path)
    yield b
    b.close()


@pytest.fixture
def proxied(net_backend: Any) -> Any:
    """(backend, proxy, connect through a chaos proxy in front of its server)."""
    if net_backend.name == "postgresql":
        import psycopg

        parts = dict(p.split("=", 1) for p in backends.PG_DSN.split())
        proxy = ChaosProxy(parts["host"], int(parts["port"])).start()
        dsn = f"host=127.0.0.1 port={proxy.port} dbname={parts['dbname']} user={parts['user']}"
        connect = functools.partial(psycopg.connect, dsn, connect_timeout=2)
    else:
        import pymysql

        proxy = ChaosProxy(backends.MYSQL_ARGS["host"], backends.MYSQL_ARGS["port"]).start()
        args = dict(backends.MYSQL_ARGS, host="127.0.0.1", port=proxy.port)
        connect = functools.partial(pymysql.connect, **args, connect_timeout=2, read_timeout=2, write_timeout=2)
    yield net_backend, proxy, connect
    proxy.stop()


def _test_backend(request: Any) -> Any:
    for fixture in ("backend", "net_backend", "pg", "maria", "sqlite_backend"):
        if fixture in request.fixturenames:
            return request.getfixturevalue(fixture)
    raise LookupError("the table fixture needs a backend fixture")


@pytest.fixture
def table(request: Any) -> Any:
    """A fresh table ``(id INT PRIMARY KEY, v VARCHAR(100))`` named after the test."""
    backend = _test_backend(request)
    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:50].lower()
    backend.execute(f"DROP TABLE IF EXISTS {name}")
    backend.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, v VARCHAR(100))")
    yield name
    try:
        backend.execute(f"DROP TABLE IF EXISTS {name}")
    except Exception:
        pass


@pytest.fixture
def no_orphans(caplog: Any) -> Any:
    """Fails the test if the pool got a connection back only because the
    garbage collector found it dropped: that is a last resort, not a fix."""
    caplog.set_level(logging.WARNING, logger="poolkit.pool")
    yield
    gc.collect()
    assert "dropped without being returned" not in caplog.text


@pytest.fixture
def signal_main() -> Any:
    """``signal_main(ready, then=None)``: a thread waits until ``ready()``,
    then sends SIGUSR1 to the main thread, whose handler runs ``then()`` and
    raises :class:`Interrupted` there, inside whatever it is blocked in.

    The signal is sent again every 50 ms until the handler has run (it acts
    on the first only). CPython loses a signal that lands after a thread
    released the GIL to block on a lock and before it blocked: the wait
    goes on to its timeout (seen once in two runs of the suite with both
    cores busy). A real Ctrl-C there is lost the same way, and pressed again; the
    wait under test still has to end at the next one."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    main = threading.main_thread().ident
    assert main is not None
    actions: list[Callable[[], Any] | None] = [None]
    fired = threading.Event()
    done = threading.Event()  # the test is over: send no more

    def handler(signum: int, frame: Any) -> None:
        if fired.is_set():
            return  # one sent again before the first was acted on
        fired.set()
        then = actions[0]
        if then is not None:
            then()
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    senders: list[threading.Thread] = []

    def arm(ready: Callable[[], bool], then: Callable[[], Any] | None = None) -> None:
        actions[0] = then
        fired.clear()

        def send() -> None:
            deadline = time.monotonic() + 5
            while not ready():
                if time.monotonic() > deadline or done.is_set():
                    return  # never ready: the main thread's own timeout fails the test
                time.sleep(0.001)
            while not done.is_set() and time.monotonic() < deadline + 5:
                signal.pthread_kill(main, signal.SIGUSR1)
                if fired.wait(0.05):
                    return

        t = threading.Thread(target=send, daemon=True)
        t.start()
        senders.append(t)

    yield arm
    done.set()
    for t in senders:
        t.join(5)
    signal.signal(signal.SIGUSR1, old)  # after the last send: SIGUSR1's default ends the process
