"""The pool core against real servers: SQLite, PostgreSQL, MariaDB."""

from __future__ import annotations

import functools
import logging
import sqlite3
import sys
import threading
import time
from typing import Any

import pytest

import poolkit
from poolkit import Pool
from poolkit.testing import Faulty

pytestmark = pytest.mark.integration


def test_round_trip(backend: Any, table: str) -> None:
    with Pool(backend.connect, max_size=2, name=backend.name) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a')")
            conn.commit()
            cur.execute(f"SELECT v FROM {table} WHERE id = 1")
            assert cur.fetchone()[0] == "a"


def test_connection_killed_while_idle_is_never_handed_out(net_backend: Any) -> None:
    with Pool(net_backend.connect, max_size=2, name=net_backend.name) as pool:
        with pool.connection() as conn:
            victim = conn.driver_connection
            victim_id = net_backend.server_id(victim)
        net_backend.kill(victim)
        # the caller sees no error: the pool finds the dead one before handing it out
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
            assert net_backend.server_id(conn.driver_connection) != victim_id
        s = pool.stats()
        assert s.closed_bad == 1


def test_a_pause_of_the_process_is_seen_at_the_next_checkout_of_a_server_connection(backend: Any) -> None:
    """The process paused for a minute (a frozen container, an AWS Lambda
    between requests) and its maintenance thread did not tick: the clock
    jumps, no tick follows. The next checkout of a connection to a server
    (which a proxy may have cut meanwhile) pings it; an sqlite3 connection
    (nothing cut it) is judged by the clock of the last tick, and pinged
    once the tick comes."""
    offset = 0.0

    def clock() -> float:
        return time.monotonic() + offset

    with Pool(backend.connect, max_size=1, name=backend.name, ping_after=30, clock=clock) as pool:
        with pool.connection():
            pass
        offset += 60
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        if backend.name == "sqlite":
            assert pool.stats().pings == 0
            pool._tick_clock()
            with pool.connection():
                pass
        assert pool.stats().pings == 1


def test_a_connection_its_driver_closed_behind_the_pools_back_is_discarded_on_return(net_backend: Any) -> None:
    """The driver closes its socket on an error the pool never saw (raised on
    the driver's own connection). The probe cannot see a closed socket (it
    leaves the probe's epoll set), so the state read on return must catch it;
    ping is off, so nothing at checkout would."""
    with Pool(net_backend.connect, max_size=1, ping=False) as pool:
        with pool.connection() as conn:
            raw = conn.driver_connection
            net_backend.kill(raw)
            with pytest.raises(Exception):  # whatever the driver raises
                cur = raw.cursor()  # around the pool's proxy: it sees nothing
                cur.execute("SELECT 1")
                cur.fetchall()
        assert pool.stats().closed_bad == 1
        with pool.connection() as conn:
            assert conn.driver_connection is not raw
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1


def test_killed_idle_connections_detected_without_ping_round_trip(net_backend: Any) -> None:
    """The liveness probe alone (ping off) catches the server's kill."""
    with Pool(net_backend.connect, max_size=3, ping=False) as pool:
        conns = [pool.acquire() for _ in range(3)]
        raws = [c.driver_connection for c in conns]
        for c in conns:
            c.close()
        for raw in raws:
            net_backend.kill(raw)
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert conn.driver_connection not in raws
        assert pool.stats().closed_bad == 3
        assert pool.stats().pings == 0


def test_open_transaction_is_rolled_back_before_the_next_borrower(backend: Any, table: str) -> None:
    with Pool(backend.connect, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'uncommitted')")
            first = conn.driver_connection
            # leaves without commit
        with pool.connection() as conn:
            assert conn.driver_connection is first  # the same connection...
            cur = conn.cursor()
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone()[0] == 0  # ...but the write is gone
        assert backend.execute(f"SELECT count(*) FROM {table}")[0][0] == 0


def _autocommit(backend: Any, conn: Any, on: bool | None = None) -> Any:
    """Turn autocommit on through the pool's proxy, each driver its own way;
    with ``on`` None, say whether it is on."""
    if backend.name == "sqlite":
        if on is None:
            return conn.isolation_level is None
        conn.isolation_level = None
    elif backend.name == "mariadb":
        if on is None:
            return conn.get_autocommit()
        conn.autocommit(True)
    else:
        if on is None:
            return conn.autocommit
        conn.autocommit = True
    return None


@pytest.mark.parametrize("wrapped", [False, True], ids=["driver", "wrapped"])
def test_autocommit_one_borrower_turns_on_is_off_for_the_next(backend: Any, table: str, wrapped: bool) -> None:
    # Left on, the next borrower's uncommitted write, which a return rolls
    # back, would be committed instead. (Wrapped: in poolkit.testing.Faulty,
    # whose connections the pool sees through to the driver's.)
    connect = Faulty(backend.connect).connect if wrapped else backend.connect
    with Pool(connect, max_size=1) as pool:
        with pool.connection() as conn:
            _autocommit(backend, conn, on=True)
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'autocommitted')")
            first = conn.driver_connection
        with pool.connection() as conn:
            assert conn.driver_connection is first
            assert not _autocommit(backend, conn)
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'uncommitted')")
        assert backend.execute(f"SELECT id FROM {table}") == [(1,)]


def test_a_read_only_session_is_not_left_to_the_next_borrower(pg: Any, table: str) -> None:
    # Left read-only, the next borrower's write would fail with 25006, which
    # reads as a failover (NOT_LEADER): the pool would invalidate itself.
    with Pool(pg.connect, max_size=1) as pool:
        with pool.connection() as conn:
            conn.read_only = True
            cur = conn.cursor()
            cur.execute("SHOW transaction_read_only")
            assert cur.fetchone()[0] == "on"
        with pool.connection() as conn:
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'written')")
            conn.commit()
        assert pool.stats().generation == 0
    assert pg.execute(f"SELECT count(*) FROM {table}")[0][0] == 1


@pytest.mark.parametrize("commit", [True, False], ids=["committed", "rolled-back"])
def test_a_held_cursor_left_open_does_not_reach_the_next_borrower(pg: Any, commit: bool) -> None:
    """psycopg's WITH HOLD server cursor outlives its transaction: left open
    at return, it kept its rows on the server and its name taken, and the
    next borrower's cursor of that name failed with DuplicateCursor. The
    return closes it (one whose transaction the return rolled back is gone
    already), and keeps the connection."""
    with Pool(pg.connect, max_size=1, name="pg") as pool:
        with pool.connection() as conn:
            cur = conn.cursor("held", withhold=True)
            cur.execute("SELECT generate_series(1, 1000)")
            if commit:
                conn.commit()
            assert cur.fetchone()[0] == 1
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone()[0] == 0
            cur = conn.cursor("held", withhold=True)
            cur.execute("SELECT 2")
            assert cur.fetchone()[0] == 2
            cur.close()
            conn.commit()
        assert pool.stats().closed == 0


def test_psycopgs_set_methods_are_settings_too(pg: Any, table: str) -> None:
    # conn.set_autocommit(True), set_read_only(True)... change what the
    # assignments change, and were read through to the driver: left on for
    # the next borrower, whose uncommitted write committed as it ran, and
    # whose writes then failed as read-only (a false failover).
    import psycopg

    with Pool(pg.connect, max_size=1) as pool:
        with pool.connection() as conn:
            conn.set_autocommit(True)
            conn.set_read_only(True)
            conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            conn.set_deferrable(True)
            assert conn.autocommit and conn.read_only and conn.deferrable
        with pool.connection() as conn:
            assert (conn.autocommit, conn.read_only, conn.isolation_level, conn.deferrable) == (False, None, None, None)
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'uncommitted')")  # rolled back on return
        with pytest.raises(poolkit.ManagedTransactionError, match="a change of autocommit"):
            pool.run(lambda conn: conn.set_autocommit(True))
        with pool.connection() as conn, pytest.raises(AttributeError):
            conn.set_no_such_thing  # noqa: B018 - not a setting: the driver's AttributeError
        assert pool.stats().generation == 0
    assert pg.execute(f"SELECT count(*) FROM {table}")[0][0] == 0


@pytest.mark.parametrize("reset", [True, False])
def test_session_state_is_gone_for_the_next_borrower_with_reset_session(net_backend: Any, reset: bool) -> None:
    if net_backend.name == "postgresql":
        set_sql, get_sql, default = "SET application_name = 'borrower-one'", "SHOW application_name", ""
    else:
        set_sql, get_sql, default = "SET @poolkit_marker = 'borrower-one'", "SELECT @poolkit_marker", None
    with Pool(net_backend.connect, max_size=1, reset_session=reset) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute(set_sql)
            conn.commit()
            first = conn.driver_connection
        with pool.connection() as conn:
            assert conn.driver_connection is first
            cur = conn.cursor()
            cur.execute(get_sql)
            value = cur.fetchone()[0]
        assert value == (default if reset else "borrower-one")


def test_the_next_borrower_is_on_the_database_the_connection_was_opened_on(maria: Any, table: str) -> None:
    # MySQL's default database is session state: left changed, the next
    # borrower's unqualified tables were another database's (its writes went
    # there). select_db() is put back on return, like a setting; a USE in
    # SQL, by reset_session (COM_RESET_CONNECTION keeps the database).
    maria.execute("CREATE DATABASE IF NOT EXISTS poolkit_other")

    def database(conn: Any) -> str:
        cur = conn.cursor()
        cur.execute("SELECT DATABASE()")
        return str(cur.fetchone()[0])

    with Pool(maria.connect, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            conn.select_db("poolkit_other")
            assert database(conn) == "poolkit_other"
        with pool.connection() as conn:
            assert conn.driver_connection is first  # put back, not replaced
            assert database(conn) == "test"
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'here')")
            conn.commit()
    assert maria.execute(f"SELECT count(*) FROM {table}")[0][0] == 1
    with Pool(maria.connect, max_size=1, reset_session=True) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("USE poolkit_other")
        with pool.connection() as conn:
            assert database(conn) == "test"
    # opened on no database: there is no way back to none, so it is not reused
    import pymysql
    from backends import MYSQL_ARGS

    with Pool(functools.partial(pymysql.connect, **{**MYSQL_ARGS, "database": None}), max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            conn.select_db("poolkit_other")
        with pool.connection() as conn:
            assert conn.driver_connection is not first
            assert database(conn) == "None"
        assert pool.stats().closed == 1


def test_cursor_classes_and_prepared_statement_caps_are_put_back(net_backend: Any) -> None:
    # PyMySQL's cursorclass set through the proxy reached the next borrower,
    # whose row[0] then raised KeyError on a dict row (psycopg's prepared_max
    # too): setting them failed with "no attribute", read through as they are.
    name, value = ("cursorclass", None) if net_backend.name == "mariadb" else ("prepared_max", 3)
    if value is None:
        import pymysql.cursors

        value = pymysql.cursors.DictCursor
    with Pool(net_backend.connect, max_size=1) as pool:
        with pool.connection() as conn:
            before = getattr(conn, name)
            setattr(conn, name, value)
            assert getattr(conn.driver_connection, name) is value
        with pool.connection() as conn:
            assert getattr(conn.driver_connection, name) == before
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        assert pool.stats().created == 1


@pytest.mark.parametrize("opened_with", [False, True])
def test_autocommit_set_in_sql_does_not_reach_the_next_borrower(maria: Any, table: str, opened_with: bool) -> None:
    # SET autocommit sent as SQL, behind PyMySQL's back: with it left on, the
    # next borrower's write committed as it ran, and its rollback undid
    # nothing; left off, a connection opened with autocommit=True kept the
    # next borrower's writes in a transaction that the return rolled back.
    import pymysql
    from backends import MYSQL_ARGS

    connect = functools.partial(pymysql.connect, **{**MYSQL_ARGS, "autocommit": opened_with})
    with Pool(connect, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            conn.cursor().execute(f"SET autocommit = {int(not opened_with)}")
        with pool.connection() as conn:
            assert conn.driver_connection is first  # put back, not closed
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'next')")
            if not opened_with:
                conn.rollback()
        assert maria.execute(f"SELECT count(*) FROM {table}")[0][0] == (1 if opened_with else 0)
        assert pool.stats().closed == 0


def test_run_and_transaction_are_atomic_on_the_servers_default_autocommit(maria: Any, table: str) -> None:
    # pymysql.connect(autocommit=None) keeps the server's default, on. The
    # pool sent BEGIN only when PyMySQL's mode was true, so none went: each
    # statement of the work committed as it ran, and a run or a transaction
    # block that failed half way kept its first half.
    import pymysql
    from backends import MYSQL_ARGS

    connect = functools.partial(pymysql.connect, **{**MYSQL_ARGS, "autocommit": None})

    def half(conn: Any) -> None:
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'first half')")
        raise RuntimeError("changed my mind")

    with Pool(connect, max_size=1) as pool:
        with pytest.raises(RuntimeError):
            pool.run(half)
        with pytest.raises(RuntimeError), pool.transaction() as conn:
            half(conn)
        pool.run(lambda conn: conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'whole')"))
    assert maria.execute(f"SELECT id FROM {table}") == [(2,)]


def test_a_ping_through_the_pool_never_reconnects(maria: Any, table: str) -> None:
    # PyMySQL's conn.ping(reconnect=True) (the default before PyMySQL 1.2, and
    # a common idiom) opened a new session behind the pool's back: work in
    # pool.run went on in it, outside its transaction, so the insert before
    # the ping was lost, the one after it committed, and run reported success.
    with Pool(maria.connect, max_size=1) as pool:
        with pool.connection() as conn:
            session = maria.server_id(conn.driver_connection)
            conn.ping(reconnect=True)  # alive: a ping, and the same session
            conn.ping()
            assert maria.server_id(conn.driver_connection) == session

        def work(conn: Any) -> None:
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'before')")
            maria.kill(conn.driver_connection)
            conn.ping(reconnect=True)
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'after')")

        with pytest.raises(Exception) as caught:
            pool.run(work)
        assert poolkit.classify(caught.value).category is poolkit.Category.BAD_CONNECTION
        assert pool.stats().closed_bad == 1
    assert maria.execute(f"SELECT count(*) FROM {table}")[0][0] == 0  # neither half


def test_a_reconnect_through_the_pool_is_refused(maria: Any, table: str) -> None:
    # PyMySQL's conn.connect() opens a new socket and session in place (and
    # leaves the old one open): work in pool.run went on in the new session,
    # so the insert before it was lost, the one after it committed, and run
    # reported success.
    def work(conn: Any) -> None:
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'before')")
        conn.connect()
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'after')")

    with Pool(maria.connect, max_size=1) as pool:
        with pytest.raises(AttributeError, match=r"connect\(\) is not available through the pool"):
            pool.run(work)
        with pool.connection() as conn:
            assert not hasattr(conn, "connect")
            conn.cursor().execute("SELECT 1")  # the pooled session, still good
        assert pool.stats().closed == 0
    assert maria.execute(f"SELECT count(*) FROM {table}")[0][0] == 0  # neither half


def test_configure_that_leaves_a_transaction_open_is_refused(pg: Any) -> None:
    # psycopg opens a transaction at configure's first statement, a SET too.
    # Left open, the first borrower's rollback on return undid the SET for
    # every later borrower. As psycopg_pool does, the pool refuses it.
    def unfinished(raw: Any) -> None:
        raw.execute("SET search_path TO pg_catalog")

    with Pool(pg.connect, max_size=1, configure=unfinished) as pool:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"configure left the new connection in a transaction.*conn.commit\(\)"):
            pool.acquire(timeout=10)
        assert time.monotonic() - t0 < 2  # at once, not retried as a server that does not answer
        assert pool.stats().open == 0

    def finished(raw: Any) -> None:
        unfinished(raw)
        raw.commit()

    with Pool(pg.connect, max_size=1, configure=finished) as pool:
        for _ in range(2):  # the first borrower's rollback on return keeps it
            with pool.connection() as conn:
                assert conn.execute("SHOW search_path").fetchone()[0] == "pg_catalog"
                conn.execute("SELECT 1")  # a transaction, rolled back on return


def test_a_connect_callable_that_leaves_a_transaction_open_is_refused(pg: Any) -> None:
    # The same for a connect callable that sets the session up itself (a SET
    # after psycopg.connect()): the first borrower saw it, every later one
    # got the server's default, with nothing said.
    def unfinished() -> Any:
        raw = pg.connect()
        raw.execute("SET search_path TO pg_catalog")
        return raw

    with Pool(unfinished, max_size=1) as pool:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"connect left the new connection in a transaction.*configure hook"):
            pool.acquire(timeout=10)
        assert time.monotonic() - t0 < 2
        assert pool.stats().open == 0

    def finished() -> Any:
        raw = unfinished()
        raw.commit()
        return raw

    with Pool(finished, max_size=1) as pool:
        for _ in range(2):
            with pool.connection() as conn:
                assert conn.execute("SHOW search_path").fetchone()[0] == "pg_catalog"
                conn.execute("SELECT 1")


def test_what_configure_set_survives_reset_session(net_backend: Any) -> None:
    # The driver's reset (RESET ALL, COM_RESET_CONNECTION) put the session's
    # settings back to the server's defaults, configure's too: from the
    # second borrower on, a configured search_path was gone (unqualified
    # tables were public's), a configured time zone was the server's.
    if net_backend.name == "postgresql":
        configured, other, show = "SET search_path TO pg_catalog", "SET search_path TO public", "SHOW search_path"
        want = "pg_catalog"
    else:
        configured, other, show = "SET time_zone = '+03:00'", "SET time_zone = '+05:00'", "SELECT @@session.time_zone"
        want = "+03:00"

    def configure(raw: Any) -> None:
        raw.cursor().execute(configured)
        raw.commit()

    def value(conn: Any) -> str:
        cur = conn.cursor()
        cur.execute(show)
        return str(cur.fetchone()[0])

    with Pool(net_backend.connect, max_size=1, reset_session=True, configure=configure) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                assert value(conn) == want
                conn.cursor().execute(other)  # this borrower's own, committed: reset for the next
                conn.commit()
                assert value(conn) != want
        assert pool.stats().created == 1


def test_reset_session_keeps_the_connection_usable(net_backend: Any, table: str) -> None:
    with Pool(net_backend.connect, max_size=1, reset_session=True) as pool:
        for i in range(3):
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {table} (id, v) VALUES ({i}, 'x')")
                conn.commit()
        assert net_backend.execute(f"SELECT count(*) FROM {table}")[0][0] == 3
        assert pool.stats().created == 1


def test_ping_with_timeout_detects_a_dead_server_connection(net_backend: Any) -> None:
    with Pool(net_backend.connect, max_size=1, ping_after=0, liveness=False) as pool:
        with pool.connection() as conn:
            victim = conn.driver_connection
        net_backend.kill(victim)
        with pool.connection() as conn:  # liveness off: the ping catches it
            assert conn.driver_connection is not victim
        s = pool.stats()
        assert s.ping_failures == 1 and s.closed_bad == 1


def test_100_threads_on_a_pool_of_10_never_open_more_than_10(backend: Any) -> None:
    created: list[Any] = []
    lock = threading.Lock()

    def connect() -> Any:
        raw = backend.connect()
        with lock:
            created.append(raw)
        return raw

    peak_server = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak_server
        while not stop.is_set():
            with lock:
                ids = [backend.server_id(r) for r in created] if backend.name != "sqlite" else []
            if ids:
                peak_server = max(peak_server, len(backend.alive_ids(ids)))
            time.sleep(0.005)

    with Pool(connect, max_size=10, timeout=60) as pool:
        barrier = threading.Barrier(100)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait()
                for _ in range(5):
                    with pool.connection() as conn:
                        cur = conn.cursor()
                        cur.execute("SELECT 1")
                        cur.fetchall()
            except BaseException as exc:
                errors.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=worker) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        watcher.join()
        assert not errors, errors[:3]
        assert len(created) <= 10
        assert peak_server <= 10
        s = pool.stats()
        assert s.acquired == 500 and s.open <= 10


def _tls_advice(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ssl_disabled=True" in r.getMessage()]


def test_pymysql_building_a_tls_context_it_does_not_use_is_reported_once(maria: Any, caplog: Any) -> None:
    """PyMySQL's default (TLS if the server offers it) loads the CA store on
    every connect. Against a server that offers no TLS that is CPU spent for
    nothing on each reconnect; the pool says so, once, with the fix."""
    import pymysql
    from backends import MYSQL_ARGS
    from pymysql.constants import CLIENT

    args = {k: v for k, v in MYSQL_ARGS.items() if k != "ssl_disabled"}  # PyMySQL's default
    offers_tls = bool(maria.admin.server_capabilities & CLIENT.SSL)  # then the context is used
    caplog.set_level("WARNING", logger="poolkit.pool")
    with Pool(functools.partial(pymysql.connect, **args), max_size=3, name="tls") as pool:
        conns = [pool.acquire() for _ in range(3)]  # three connects
        for c in conns:
            c.close()
    advice = _tls_advice(caplog)
    if offers_tls:  # nothing to say
        assert advice == []
    else:
        assert len(advice) == 1
        assert advice[0].startswith("pool 'tls': PyMySQL built a TLS context")


def test_pymysql_with_tls_disabled_gets_no_advice(maria: Any, caplog: Any) -> None:
    caplog.set_level("WARNING", logger="poolkit.pool")
    with Pool(maria.connect, max_size=2, name="plain") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
    assert _tls_advice(caplog) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda conn: conn.set_authorizer(lambda *a: sqlite3.SQLITE_DENY),
        lambda conn: conn.set_progress_handler(lambda: 1, 1),
        lambda conn: conn.set_trace_callback(print),
        lambda conn: conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 10),
        lambda conn: conn.deserialize(conn.serialize()),
        pytest.param(
            lambda conn: conn.setconfig(sqlite3.SQLITE_DBCONFIG_ENABLE_FKEY, True),
            marks=pytest.mark.skipif(sys.version_info < (3, 12), reason="setconfig is Python 3.12+ (py313 runs it)"),
        ),
    ],
    ids=["authorizer", "progress_handler", "trace_callback", "setlimit", "deserialize", "setconfig"],
)
def test_sqlite_handlers_a_borrower_installs_do_not_reach_the_next(
    sqlite_backend: Any, table: str, call: Any, caplog: Any
) -> None:
    # sqlite3's set_authorizer(), set_progress_handler(), set_trace_callback(),
    # setlimit() and setconfig() have no getter to save and restore: left for
    # the next borrower, its statements were denied, interrupted, traced (with
    # their values) or refused as too long. deserialize() swaps the database
    # for an in-memory copy: the next borrower's commit went there, and was
    # lost at close. The connection is closed instead.
    with Pool(sqlite_backend.connect, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            call(conn)
        with pool.connection() as conn:
            assert conn.driver_connection is not first
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'the next borrower, unhindered')")
            conn.commit()
        assert "cannot be undone for the next borrower" in caplog.text
        with pool.connection() as conn:  # no such call: kept
            second = conn.driver_connection
        with pool.connection() as conn:
            assert conn.driver_connection is second
    assert sqlite_backend.execute(f"SELECT count(*) FROM {table}")[0][0] == 1


def test_a_character_set_a_borrower_sets_does_not_reach_the_next(maria: Any, table: str) -> None:
    # PyMySQL's set_character_set() changes the session's and the client's
    # character set together: the next borrower read utf8mb4 text as latin1
    # ('?' for what latin1 cannot hold), and a read-modify-write stored it.
    maria.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4")
    maria.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'José 李')")
    with Pool(maria.connect, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            conn.set_character_set("latin1")

        def shout(conn: Any) -> str:
            cur = conn.cursor()
            cur.execute(f"SELECT v FROM {table} WHERE id = 1")
            (v,) = cur.fetchone()
            cur.execute(f"UPDATE {table} SET v = %s WHERE id = 1", (v.upper(),))
            return str(v)

        assert pool.run(shout) == "José 李"
        assert pool.stats().created == 2 and first.open is False
    assert maria.execute(f"SELECT v FROM {table}")[0][0] == "JOSÉ 李"


def test_psycopg_handlers_a_borrower_adds_are_removed_on_return(pg: Any) -> None:
    # add_notice_handler() and add_notify_handler() through the proxy piled
    # up on the driver's connection with every checkout (a leak, each holding
    # what its caller's closure held), and the next borrowers' notices went
    # to every earlier borrower's handler.
    def notice(conn: Any) -> None:
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")

    with Pool(pg.connect, max_size=1) as pool:
        heard: list[int] = []
        for i in range(3):
            with pool.connection() as conn:
                conn.add_notice_handler(lambda diag, i=i: heard.append(i))
                conn.add_notify_handler(lambda n: None)
                notice(conn)
                raw = conn.driver_connection
        assert heard == [0, 1, 2]  # each borrower heard its own notice only
        with pool.connection() as conn:
            assert conn.driver_connection is raw
            notice(conn)
            handler = heard.append
            conn.add_notice_handler(handler)
            conn.remove_notice_handler(handler)  # removed by the caller: nothing left to undo
        assert heard == [0, 1, 2]
        assert not raw._notice_handlers and not raw._notify_handlers
        with pool.connection() as conn:  # and the connection is kept
            assert conn.driver_connection is raw


def test_reset_session_on_a_driver_with_no_reset_says_so(backend: Any, caplog: Any) -> None:
    # sqlite3 has no session reset: reset_session=True did nothing, silently.
    with caplog.at_level(logging.WARNING, logger="poolkit.pool"), Pool(backend.connect, reset_session=True) as pool:
        for _ in range(2):
            with pool.connection():
                pass
    said = [r for r in caplog.records if "has no session reset" in r.getMessage()]
    assert len(said) == (1 if backend.name == "sqlite" else 0)


def test_the_readmes_quick_start_runs_as_written(pg: Any) -> None:
    # Its second order once had the first's id, and the example raised
    # UniqueViolation where a reader copied it.
    import os
    import re

    from backends import PG_DSN

    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    found = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S)
    assert found is not None
    code = found.group(1)
    assert '"host=db dbname=app"' in code
    for table in ("orders", "poolkit_requests"):  # the example's table, and the default ledger
        pg.execute(f"DROP TABLE IF EXISTS {table}")
    pg.execute("CREATE TABLE orders (id INT PRIMARY KEY, paid BOOLEAN NOT NULL DEFAULT false)")
    try:
        exec(compile(code.replace('"host=db dbname=app"', repr(PG_DSN)), "README quick start", "exec"), {})
        assert pg.execute("SELECT id, paid FROM orders ORDER BY id") == [(41, False), (42, True)]
        assert pg.execute("SELECT request_id FROM poolkit_requests") == [("order-42",)]
    finally:
        for table in ("orders", "poolkit_requests"):
            pg.execute(f"DROP TABLE IF EXISTS {table}")
