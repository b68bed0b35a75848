"""Error classification and safe retries, proven on real driver errors.

Every error here is provoked on the real server (PostgreSQL, MariaDB,
SQLite), and each test checks the category, what the pool did with the
connection, and what ``pool.run`` did with the work.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import poolkit
from poolkit import AmbiguousCommitError, Category, Pool, Retry, classify

pytestmark = pytest.mark.integration

FAST = Retry(attempts=6, deadline=20, initial_backoff=0.01, max_backoff=0.1)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def is_closed(raw: Any) -> bool:
    return bool(raw.closed) if hasattr(raw, "closed") else not raw.open  # PyMySQL says .open


def count(backend: Any, table: str) -> int:
    return int(backend.execute(f"SELECT count(*) FROM {table}")[0][0])


def server_is_running(backend: Any, sid: int, fragment: str) -> bool:
    """The server connection ``sid`` is executing a statement containing ``fragment``."""
    if backend.name == "postgresql":
        rows = backend.execute("SELECT query FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (sid,))
    else:
        rows = backend.execute("SELECT info FROM information_schema.processlist WHERE id = %s", (sid,))
    return bool(rows) and fragment.lower() in (rows[0][0] or "").lower()


def sleep_sql(backend: Any, seconds: int) -> str:
    return f"SELECT pg_sleep({seconds})" if backend.name == "postgresql" else f"SELECT SLEEP({seconds})"


# --------------------------------------------------- connections killed


def test_killed_while_idle_error_is_bad_connection_and_discarded(net_backend: Any) -> None:
    # liveness and ping off: the error reaches the caller, and the pool acts on it
    with Pool(net_backend.connect, max_size=1, liveness=False, ping=False) as pool:
        with pool.connection() as conn:
            victim = conn.driver_connection
        net_backend.kill(victim)
        with pytest.raises(Exception) as info:
            with pool.connection() as conn:
                conn.cursor().execute("SELECT 1")
        c = classify(info.value)
        assert c.category is Category.BAD_CONNECTION, (c, info.value)
        assert pool.stats().closed_bad == 1
        with pool.connection() as conn:
            assert conn.driver_connection is not victim


def test_killed_mid_query_is_bad_connection(net_backend: Any) -> None:
    with Pool(net_backend.connect, max_size=1) as pool:
        conn = pool.acquire()
        sid = net_backend.server_id(conn.driver_connection)
        errors: list[BaseException] = []

        def run_query() -> None:
            try:
                conn.cursor().execute(sleep_sql(net_backend, 10))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run_query)
        t.start()
        wait_until(lambda: server_is_running(net_backend, sid, "leep"), what="the query to start")
        net_backend.kill(conn.driver_connection, wait=False)
        t.join(15)
        conn.close()
        assert errors, "the killed query did not fail"
        assert classify(errors[0]).category is Category.BAD_CONNECTION, errors[0]
        s = pool.stats()
        assert s.closed_bad == 1 and s.open == 0


def _kill_when_running(backend: Any, fragment: str, once: list[bool]) -> Callable[[Any], None]:
    """A helper for ``fn``: on the first call only, kill this connection from
    the server while it runs a statement containing ``fragment``."""

    def arm(conn: Any) -> None:
        if once:
            return
        once.append(True)
        sid = backend.server_id(conn.driver_connection)
        raw = conn.driver_connection

        def killer() -> None:
            wait_until(lambda: server_is_running(backend, sid, fragment), what="the statement to run")
            backend.kill(raw, wait=False)

        threading.Thread(target=killer, daemon=True).start()

    return arm


def test_non_idempotent_insert_killed_after_sending_is_attempted_at_most_once(net_backend: Any, table: str) -> None:
    calls = 0
    arm = _kill_when_running(net_backend, "leep", [])

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'once')")
        arm(conn)
        cur.execute(sleep_sql(net_backend, 5))  # killed while it runs: the INSERT was sent

    with Pool(net_backend.connect, max_size=2, retry=FAST) as pool:
        with pytest.raises(Exception) as info:
            pool.run(work)
        assert classify(info.value).category is Category.BAD_CONNECTION
        assert calls == 1
        assert pool.stats().retries == 0
    assert count(net_backend, table) <= 1  # at most one row (here: rolled back by the kill)


def test_idempotent_work_killed_mid_way_is_retried_and_succeeds(net_backend: Any, table: str) -> None:
    calls = 0
    arm = _kill_when_running(net_backend, "leep", [])

    def work(conn: Any) -> str:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"DELETE FROM {table} WHERE id = 1")
        cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'idem')")
        arm(conn)
        cur.execute(sleep_sql(net_backend, 1))
        return "ok"

    with Pool(net_backend.connect, max_size=2, retry=FAST) as pool:
        assert pool.run(work, idempotent=True) == "ok"
        assert calls == 2
        assert pool.stats().retries == 1
    assert count(net_backend, table) == 1


def test_a_lost_connection_is_retried_at_once_and_a_second_loss_after_a_wait(
    net_backend: Any, caplog: Any, retry_waits: Any
) -> None:
    # A pooled connection that dies under the work (a proxy cut it, the server
    # killed it) says nothing about the server: the retry takes another
    # connection without waiting. A second loss backs off as the budget says.
    budget = Retry(attempts=4, deadline=20, initial_backoff=0.3, max_backoff=0.3)
    starts: list[float] = []
    lost: list[float] = []

    def read(conn: Any) -> int:
        starts.append(time.monotonic())
        cur = conn.cursor()
        if len(starts) <= 2:
            net_backend.kill(conn.driver_connection)  # waits until the server has let it go
            lost.append(time.monotonic())
        cur.execute("SELECT 42")
        return int(cur.fetchone()[0])

    with Pool(net_backend.connect, max_size=2, retry=budget) as pool:
        with caplog.at_level("WARNING", logger="poolkit.retry"):
            assert pool.run(read, idempotent=True) == 42
        assert pool.stats().retries == 2 and pool.stats().closed_bad == 2
    assert retry_waits("poolkit.retry") == [0.0, 0.3]
    assert starts[1] - lost[0] < 0.25  # at once: a new connection, no backoff (which is 0.3)
    assert starts[2] - lost[1] >= 0.3 - 0.01


def slow_commit_work(pg: Any, table: str, seconds: int) -> tuple[Callable[[Any], None], list[int]]:
    """Work whose COMMIT takes ``seconds`` (a deferred constraint trigger
    sleeps in it) and whose first COMMIT is killed from the server while it
    runs: the client cannot know whether it applied. Returns the work and a
    one-item list counting its calls."""
    pg.execute(
        "CREATE OR REPLACE FUNCTION poolkit_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
    )
    pg.execute(
        f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table} "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION poolkit_slow_commit()"
    )
    calls = [0]

    def work(conn: Any) -> None:
        calls[0] += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'commit')")
        if calls[0] == 1:
            raw = conn.driver_connection
            sid = pg.server_id(raw)

            def killer() -> None:
                wait_until(lambda: server_is_running(pg, sid, "COMMIT"), what="COMMIT to run")
                pg.kill(raw, wait=False)

            threading.Thread(target=killer, daemon=True).start()

    return work, calls


def test_connection_killed_during_commit_is_ambiguous_and_not_retried(pg: Any, table: str) -> None:
    """A deferred constraint trigger makes COMMIT itself slow, so the server
    kill lands inside COMMIT: the client cannot know whether it applied."""
    work, calls = slow_commit_work(pg, table, 3)

    with Pool(pg.connect, max_size=2, retry=FAST) as pool:
        with pytest.raises(AmbiguousCommitError) as info:
            pool.run(work)
        assert classify(info.value.__cause__).category is Category.BAD_CONNECTION
        assert calls[0] == 1  # not retried: a blind retry could write twice
        assert pool.stats().closed_bad == 1
    assert count(pg, table) <= 1


# ------------------------------------------- read-only: the failover symptom


def _read_only_sql(backend: Any) -> str:
    if backend.name == "postgresql":
        return "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
    return "SET SESSION TRANSACTION READ ONLY"


def test_read_only_node_is_not_leader_and_invalidates_the_pool(net_backend: Any, table: str) -> None:
    """Connections pinned to a demoted primary: every one of them is
    read-only. The first write fails with 25006 / 1792, the pool invalidates
    itself, and pool.run's retry lands once on a fresh connection."""
    pinned: list[Any] = []

    def configure(raw: Any) -> None:
        if len(pinned) < 3:  # the first three point at the "old primary"
            cur = raw.cursor()
            cur.execute(_read_only_sql(net_backend))
            cur.close()
            raw.commit()
            pinned.append(raw)

    with Pool(net_backend.connect, max_size=3, configure=configure, retry=FAST) as pool:
        conns = [pool.acquire() for _ in range(3)]
        for c in conns:
            c.close()
        assert pool.stats().idle == 3
        calls = 0

        def write(conn: Any) -> None:
            nonlocal calls
            calls += 1
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'after failover')")

        with pool.connection() as conn:
            with pytest.raises(Exception) as info:
                conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (0, 'x')")
        c = classify(info.value)
        assert c.category is Category.NOT_LEADER and c.reason == "read_only", info.value
        s = pool.stats()
        assert s.generation == 1  # invalidated
        assert s.idle == 0 and all(is_closed(raw) for raw in pinned[1:])
        pool.run(write)
        assert calls == 1  # the fresh connection is writable at once
    assert [tuple(r) for r in net_backend.execute(f"SELECT v FROM {table}")] == [("after failover",)]


def test_run_retries_a_write_rejected_as_not_leader(net_backend: Any, table: str) -> None:
    first: list[Any] = []

    def configure(raw: Any) -> None:
        if not first:
            cur = raw.cursor()
            cur.execute(_read_only_sql(net_backend))
            cur.close()
            raw.commit()
            first.append(raw)

    calls = 0

    def write(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")

    with Pool(net_backend.connect, max_size=2, configure=configure, retry=FAST) as pool:
        pool.run(write)
        assert calls == 2 and pool.stats().retries == 1 and pool.stats().generation == 1
    assert count(net_backend, table) == 1  # rejected once, landed once


def test_failover_moves_off_a_demoted_primary_that_still_answers(net_backend: Any, table: str) -> None:
    """The old primary is up but read-only; the new one is the second host.
    After NOT_LEADER the pool must not reconnect to the node that refused the
    write just because it was the last to accept a connection."""
    refused: list[int] = []

    def old_primary() -> Any:
        raw = net_backend.connect()
        cur = raw.cursor()
        cur.execute(_read_only_sql(net_backend))
        cur.close()
        raw.commit()
        refused.append(1)
        return raw

    calls = 0

    def write(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'on the new primary')")

    with Pool(poolkit.failover(old_primary, net_backend.connect), max_size=2, retry=FAST) as pool:
        pool.run(write)
        assert calls == 2 and pool.stats().retries == 1  # refused once by the old primary, then landed
    assert len(refused) == 1  # the retry went to the new primary, not back to the old one
    assert [tuple(r) for r in net_backend.execute(f"SELECT v FROM {table}")] == [("on the new primary",)]


def test_a_write_on_a_connection_the_caller_made_read_only_is_its_own_mistake(pg: Any, table: str) -> None:
    # psycopg's conn.read_only = True (a pool for a read-only endpoint, say):
    # a write is refused with 25006 on any node. It was NOT_LEADER: every
    # such mistake invalidated the whole pool, pool.run retried it to no
    # avail, and a failover connect moved on from a node that was fine.
    def read_only(raw: Any) -> None:
        raw.read_only = True

    calls = 0

    def write(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")

    connect = poolkit.failover(pg.connect, pg.connect)
    with Pool(connect, max_size=2, configure=read_only, retry=FAST) as pool:
        with pytest.raises(Exception) as info:
            pool.run(write)
        got = pool.classify(info.value, connection=None)
        assert got.category is Category.NOT_LEADER  # without the connection, it cannot tell
        assert calls == 1 and pool.stats().retries == 0
        assert pool.stats().generation == 0 and connect.preferred == 0
        with pool.connection() as conn:
            with pytest.raises(Exception) as info:
                conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'x')")
            got = pool.classify(info.value, connection=conn.driver_connection)
            assert (got.category, got.reason) == (Category.PERMANENT, "read_only_by_caller")
        assert pool.stats().generation == 0 and pool.stats().closed == 0
    assert count(pg, table) == 0


def test_mariadb_global_read_only_is_not_leader(maria: Any, table: str) -> None:
    """1290: the server runs with read_only, as a demoted primary does."""
    import functools

    import pymysql
    from backends import MYSQL_ARGS

    maria.execute("CREATE USER IF NOT EXISTS 'poolkit_app'@'%' IDENTIFIED BY 'pw'")
    maria.execute("CREATE USER IF NOT EXISTS 'poolkit_app'@'localhost' IDENTIFIED BY 'pw'")
    maria.execute("GRANT ALL ON test.* TO 'poolkit_app'@'%'")
    maria.execute("GRANT ALL ON test.* TO 'poolkit_app'@'localhost'")
    args = dict(MYSQL_ARGS, user="poolkit_app", password="pw")
    connect = functools.partial(pymysql.connect, **args)
    with Pool(connect, max_size=2, retry=Retry.off()) as pool:
        with pool.connection():
            pass
        maria.execute("SET GLOBAL read_only = 1")
        try:
            with pytest.raises(pymysql.err.OperationalError) as info:
                pool.run(lambda conn: conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')"))
        finally:
            maria.execute("SET GLOBAL read_only = 0")
        assert info.value.args[0] == 1290
        c = classify(info.value)
        assert c.category is Category.NOT_LEADER
        assert pool.stats().generation == 1
    assert count(maria, table) == 0


# --------------------------------------------------- transient conflicts


def test_postgresql_serialization_failure_is_retried(pg: Any, table: str) -> None:
    pg.execute(f"INSERT INTO {table} (id, v) VALUES (1, '0')")
    calls = 0
    pids: list[int] = []

    def bump(conn: Any) -> str:
        nonlocal calls
        calls += 1
        pids.append(pg.server_id(conn.driver_connection))
        cur = conn.cursor()
        cur.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cur.execute(f"SELECT v FROM {table} WHERE id = 1")
        v = int(cur.fetchone()[0])
        if calls == 1:  # a concurrent serializable transaction commits first
            pg.execute(f"UPDATE {table} SET v = '100' WHERE id = 1")
        cur.execute(f"UPDATE {table} SET v = %s WHERE id = 1", (str(v + 1),))
        return str(v + 1)

    with Pool(pg.connect, max_size=1, retry=FAST) as pool:
        assert pool.run(bump) == "101"
        assert calls == 2 and pool.stats().retries == 1
        assert pids[0] == pids[1]  # RETRYABLE keeps the connection
    assert pg.execute(f"SELECT v FROM {table}")[0][0] == "101"


def test_postgresql_session_ended_by_a_timeout_is_a_bad_connection_and_retried(
    pg: Any, table: str, monkeypatch: Any
) -> None:
    # idle_in_transaction_session_timeout ends the session (FATAL 25P03): it
    # was PERMANENT ("the server answered, so the connection works"), and
    # idempotent work that waited too long between statements failed instead
    # of running again on a new connection.
    calls = 0
    pids: list[int] = []

    def work(conn: Any) -> str:
        nonlocal calls
        calls += 1
        pids.append(pg.server_id(conn.driver_connection))
        cur = conn.cursor()
        if calls == 1:
            cur.execute("SET idle_in_transaction_session_timeout = 100")
        cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'once')", (calls,))
        if calls == 1:
            time.sleep(0.5)  # idle in the transaction: the server ends the session
        cur.execute("SELECT 1")
        return "ok"

    with Pool(pg.connect, max_size=1, retry=FAST) as pool:
        assert pool.run(work, idempotent=True) == "ok"
        assert calls == 2 and pool.stats().retries == 1 and pool.stats().closed_bad == 1
        assert pids[0] != pids[1]
    assert pg.execute(f"SELECT id FROM {table}") == [(2,)]  # the first attempt's insert went with its session

    c = pg.connect()
    try:
        c.execute("SET idle_in_transaction_session_timeout = 100")
        c.execute("SELECT 1")
        time.sleep(0.5)
        with pytest.raises(Exception) as caught:
            c.execute("SELECT 1")
    finally:
        c.close()
    got = poolkit.classify(caught.value)
    assert got.category is poolkit.Category.BAD_CONNECTION, got
    # any error after which the server ended the session (FATAL), listed or not
    from poolkit.drivers import psycopg as psycopg_driver

    monkeypatch.delitem(psycopg_driver._SQLSTATE_RULES, "25P03")
    got = poolkit.classify(caught.value)
    assert (got.category, got.reason) == (poolkit.Category.BAD_CONNECTION, "session_ended"), got


def test_psycopg_transaction_block_first_in_the_work_is_a_savepoint_of_runs_transaction(pg: Any, table: str) -> None:
    # On a connection that is not in autocommit mode psycopg begins a
    # transaction only before the first statement, so a conn.transaction()
    # block that came first was a transaction of its own, committed at its
    # end: an error after it left the row committed, and a conflict made
    # run() insert it twice. run() now sends psycopg's BEGIN itself, and the
    # block is a savepoint in it.
    calls = 0

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (id, v) VALUES ({calls}, 'x')")
        if calls == 1:
            conn.execute("SELECT 1/0")  # anything that fails after the block
        with conn.transaction():
            pass

    with Pool(pg.connect, max_size=1, retry=FAST) as pool:
        with pytest.raises(Exception, match="division by zero"):
            pool.run(work)
        assert count(pg, table) == 0  # rolled back with run's transaction
        assert calls == 1

    # the BEGIN is psycopg's own: the connection's settings go into it
    import psycopg

    def settings(raw: Any) -> None:
        raw.read_only = True
        raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ

    def show(conn: Any) -> tuple[str, str]:
        cur = conn.cursor()
        cur.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")
        return tuple(cur.fetchone())

    with Pool(pg.connect, max_size=1, retry=FAST, configure=settings) as pool:
        assert pool.run(show) == ("repeatable read", "on")
        assert pool.run(show, isolation_level="SERIALIZABLE") == ("serializable", "on")


def test_a_dead_connection_found_at_begin_is_retried_even_for_work_that_is_not_idempotent(pg: Any, table: str) -> None:
    # With no liveness probe and no ping, the pool hands out a connection the
    # server killed. BEGIN, sent before the work, finds it dead: nothing of
    # the work was sent, so run() tries again, on another connection. (psycopg
    # sent its BEGIN with the first statement, and the loss was the work's:
    # not retried.)
    with Pool(pg.connect, max_size=1, retry=FAST, liveness=False, ping=False) as pool:
        with pool.connection() as conn:
            victim = conn.driver_connection
        pg.kill(victim)
        calls = 0

        def insert(conn: Any) -> None:
            nonlocal calls
            calls += 1
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")

        pool.run(insert)
        assert calls == 1
        assert pool.stats().closed_bad == 1 and pool.stats().retries == 1
    assert count(pg, table) == 1


def test_postgresql_write_skew_between_two_serializable_transactions(pg: Any, table: str) -> None:
    """The textbook case: two SERIALIZABLE transactions each read what the
    other writes. One gets 40001; pool.run retries it and both land."""
    import psycopg

    other = psycopg.connect(pg.extra.get("dsn", None) or __import__("backends").PG_DSN)
    try:
        other.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        other.execute(f"SELECT count(*) FROM {table}")
        calls = 0

        def add(conn: Any) -> None:
            nonlocal calls
            calls += 1
            cur = conn.cursor()
            cur.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            cur.execute(f"SELECT count(*) FROM {table}")
            n = cur.fetchone()[0]
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'a')", (100 + n + calls,))
            if calls == 1:
                other.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'b')")
                other.commit()

        with Pool(pg.connect, max_size=1, retry=FAST) as pool:
            pool.run(add)
            assert calls == 2
    finally:
        other.close()
    assert count(pg, table) == 2


def test_postgresql_deadlock_is_retried(pg: Any, table: str) -> None:
    import psycopg
    from backends import PG_DSN

    pg.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a'), (2, 'b')")
    other = psycopg.connect(PG_DSN)
    other.execute("SET deadlock_timeout = '20s'")  # so the pool's transaction is the victim
    other.commit()
    b_has_2 = threading.Event()
    a_has_1 = threading.Event()
    other_errors: list[BaseException] = []

    def other_txn() -> None:
        try:
            other.execute(f"UPDATE {table} SET v = 'other' WHERE id = 2")
            b_has_2.set()
            a_has_1.wait(10)
            other.execute(f"UPDATE {table} SET v = 'other' WHERE id = 1")
            other.commit()
        except BaseException as exc:
            other_errors.append(exc)

    calls = 0

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"UPDATE {table} SET v = 'pool' WHERE id = 1")
        if calls == 1:
            a_has_1.set()
            b_has_2.wait(10)
            time.sleep(0.1)  # let the other transaction queue on row 1 (not synchronisation: the deadlock is)
        cur.execute(f"UPDATE {table} SET v = 'pool' WHERE id = 2")

    t = threading.Thread(target=other_txn)
    t.start()
    try:
        with Pool(pg.connect, max_size=1, retry=FAST) as pool:
            pool.run(work)
            assert calls == 2 and pool.stats().retries == 1
    finally:
        t.join(15)
        other.close()
    assert not other_errors
    assert sorted(r[0] for r in pg.execute(f"SELECT v FROM {table}")) == ["pool", "pool"]


def test_mariadb_deadlock_is_retried(maria: Any, table: str) -> None:
    import pymysql
    from backends import MYSQL_ARGS

    maria.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')")
    other = pymysql.connect(**MYSQL_ARGS)
    b_has_rows = threading.Event()
    a_has_1 = threading.Event()
    other_errors: list[BaseException] = []

    def other_txn() -> None:
        try:
            with other.cursor() as cur:
                # a heavier transaction (more rows changed): whichever of the two
                # closes the cycle, InnoDB rolls back the lighter one, the pool's
                for row in (2, 3, 4):  # one by one: a tiny table's IN-list update scans (and locks) every row
                    cur.execute(f"UPDATE {table} SET v = 'other' WHERE id = {row}")
                b_has_rows.set()
                a_has_1.wait(10)
                cur.execute(f"UPDATE {table} SET v = 'other' WHERE id = 1")
            other.commit()
        except BaseException as exc:
            other_errors.append(exc)

    calls = 0
    seen: list[BaseException] = []

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"UPDATE {table} SET v = 'pool' WHERE id = 1")
        if calls == 1:
            a_has_1.set()
        try:
            cur.execute(f"UPDATE {table} SET v = 'pool' WHERE id = 2")  # closes the cycle
        except Exception as exc:
            seen.append(exc)
            raise

    t = threading.Thread(target=other_txn)
    t.start()
    assert b_has_rows.wait(10)
    try:
        with Pool(maria.connect, max_size=1, retry=FAST) as pool:
            pool.run(work)
    finally:
        t.join(15)
        other.close()
    assert not other_errors
    assert seen and seen[0].args[0] == 1213
    assert classify(seen[0]).reason == "deadlock"
    assert calls == 2


def test_mariadb_lock_wait_timeout_is_retried(maria: Any, table: str) -> None:
    import pymysql
    from backends import MYSQL_ARGS

    maria.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a')")
    holder = pymysql.connect(**MYSQL_ARGS)
    with holder.cursor() as cur:
        cur.execute(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
    seen: list[BaseException] = []
    calls = 0

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        try:
            cur.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")
        except Exception as exc:
            seen.append(exc)
            holder.rollback()  # the lock holder goes away; the retry gets through
            raise

    try:
        with Pool(maria.connect, max_size=1, retry=FAST) as pool:
            pool.run(work)
    finally:
        holder.close()
    assert seen[0].args[0] == 1205
    assert classify(seen[0]).category is Category.RETRYABLE
    assert classify(seen[0]).reason == "lock_timeout"
    assert calls == 2


def test_sqlite_database_is_locked_is_retried(sqlite_backend: Any, table: str) -> None:
    import sqlite3

    blocker = sqlite3.connect(sqlite_backend.extra["path"], isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    seen: list[BaseException] = []
    calls = 0

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        try:
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")
        except Exception as exc:
            seen.append(exc)
            blocker.execute("COMMIT")
            raise

    with Pool(sqlite_backend.connect, max_size=1, retry=FAST) as pool:
        pool.run(work)
    blocker.close()
    assert "database is locked" in str(seen[0])
    assert classify(seen[0]).category is Category.RETRYABLE
    assert calls == 2
    assert count(sqlite_backend, table) == 1


def test_sqlite_reads_before_the_first_write_are_in_runs_transaction(sqlite_backend: Any, table: str) -> None:
    # sqlite3 begins a transaction only before a write: two run()s that both
    # read the counter, then both wrote what they read plus one, lost an
    # update (1, not 2). In one transaction from the start, the second
    # writer's snapshot is stale: SQLITE_BUSY, RETRYABLE, and its retry
    # reads the first one's value.
    sqlite_backend.execute(f"INSERT INTO {table} (id, v) VALUES (1, '0')")
    both_read = threading.Barrier(2)
    began: list[bool] = []

    def increment(conn: Any) -> None:
        began.append(conn.driver_connection.in_transaction)
        cur = conn.cursor()
        cur.execute(f"SELECT v FROM {table} WHERE id = 1")
        v = int(cur.fetchone()[0])
        if len(began) <= 2:  # the first attempts: both read before either writes
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=5)
        cur.execute(f"UPDATE {table} SET v = ? WHERE id = 1", (str(v + 1),))

    with Pool(sqlite_backend.connect, max_size=2, retry=FAST) as pool:
        threads = [threading.Thread(target=pool.run, args=(increment,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pool.stats().retries >= 1
    assert all(began)  # a transaction was open before the work's first statement
    assert sqlite_backend.execute(f"SELECT v FROM {table}")[0][0] == "2"


# ------------------------------------------------------ the request's fault


def test_integrity_and_syntax_errors_are_permanent_and_keep_the_connection(backend: Any, table: str) -> None:
    with Pool(backend.connect, max_size=1, retry=FAST) as pool:
        with pool.connection() as conn:
            first = conn.driver_connection
            sid = backend.server_id(first) if backend.name != "sqlite" else None
        calls = 0

        def dup(conn: Any) -> None:
            nonlocal calls
            calls += 1
            cur = conn.cursor()
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a')")
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'b')")

        with pytest.raises(Exception) as info:
            pool.run(dup, idempotent=True)
        c = classify(info.value)
        assert c.category is Category.PERMANENT and c.reason == "integrity", info.value
        assert calls == 1
        with pytest.raises(Exception) as info:
            pool.run(lambda conn: conn.cursor().execute("SELEC nonsense"), idempotent=True)
        assert classify(info.value).category is Category.PERMANENT
        with pool.connection() as conn:
            assert conn.driver_connection is first  # kept
            if sid is not None:
                assert backend.server_id(conn.driver_connection) == sid
        assert pool.stats().closed == 0
    assert count(backend, table) == 0


# ------------------------------------------------------------- request ids


def test_run_and_transaction_set_an_isolation_level_even_with_a_request_id(backend: Any, table: str) -> None:
    # With a request id the ledger's insert is the transaction's first
    # statement, too late for fn to SET TRANSACTION ISOLATION LEVEL itself:
    # isolation_level= sets it before, for that one transaction, on
    # autocommit connections too. Seen by what the levels do when another
    # connection commits a row between two reads of the transaction: READ
    # COMMITTED sees it, REPEATABLE READ does not, SERIALIZABLE does not
    # either (PostgreSQL) or holds the other's insert back (InnoDB's reads
    # take shared locks at that level).
    ledger = f"ledger_iso_{backend.name}"
    backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    ids = iter(range(1, 1000))
    other = backend.connect()
    if backend.name == "mariadb":
        other.cursor().execute("SET SESSION innodb_lock_wait_timeout = 1")

    def what_it_sees(conn: Any) -> str | None:
        cur = conn.cursor()
        cur.execute(f"SELECT count(*) FROM {table}")
        before = cur.fetchone()[0]
        if backend.name == "sqlite":
            return None  # every SQLite transaction is serializable, and a writer would wait for this one
        try:
            other.cursor().execute(f"INSERT INTO {table} (id, v) VALUES ({next(ids)}, 'x')")
            other.commit()
        except Exception as exc:
            other.rollback()
            assert classify(exc).reason == "lock_timeout", exc
            return "held back"
        cur.execute(f"SELECT count(*) FROM {table}")
        return "the new row" if cur.fetchone()[0] != before else "its snapshot"

    def autocommit(raw: Any) -> None:
        if backend.name == "mariadb":
            raw.autocommit(True)
        elif backend.name == "sqlite":
            raw.isolation_level = None
        else:
            raw.autocommit = True

    serializable = {"sqlite": None, "postgresql": "its snapshot", "mariadb": "held back"}[backend.name]
    default = {"sqlite": None, "postgresql": "the new row", "mariadb": "its snapshot"}[backend.name]
    levels = {
        "read committed": None if backend.name == "sqlite" else "the new row",
        "REPEATABLE_READ": None if backend.name == "sqlite" else "its snapshot",
        "SERIALIZABLE": serializable,
    }
    try:
        for configure in (None, autocommit):
            with Pool(backend.connect, max_size=1, ledger_table=ledger, retry=FAST, configure=configure) as pool:
                for lvl, seen in levels.items():
                    assert pool.run(what_it_sees, isolation_level=lvl) == seen, lvl
                    with pool.transaction(isolation_level=lvl) as conn:
                        assert what_it_sees(conn) == seen, lvl
                    # with a request id: the ledger's insert first, then the work, at that level
                    assert pool.run(what_it_sees, request_id=f"{lvl}-{configure}", isolation_level=lvl) == seen
                # one transaction only: the next has the server's own level again
                assert pool.run(what_it_sees) == default
                if backend.name == "postgresql":
                    with pool.transaction(isolation_level="serializable") as conn:
                        cur = conn.cursor()
                        cur.execute("SELECT current_setting('transaction_isolation')")
                        assert cur.fetchone()[0] == "serializable"
    finally:
        other.close()
        backend.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_request_id_work_runs_once_on_every_backend(backend: Any, table: str) -> None:
    ledger = f"ledger_{table}"[:60]
    backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    calls = 0

    def insert(conn: Any) -> str:
        nonlocal calls
        calls += 1
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES ({calls}, 'x')")
        return "done"

    try:
        with Pool(backend.connect, max_size=2, ledger_table=ledger, retry=FAST) as pool:
            assert pool.run(insert, request_id="req-1") == "done"
            assert pool.run(insert, request_id="req-1") is None  # finished: never run again
            assert calls == 1
            assert pool.run(insert, request_id="req-2") == "done"
            assert count(backend, table) == 2
            with pool.connection() as conn:  # and an application can ask
                assert pool.ledger.committed(conn, "req-1")
                assert not pool.ledger.committed(conn, "req-3")
            assert pool.prune_requests(older_than=3600) == 0
            assert pool.prune_requests(older_than=0) >= 0
    finally:
        backend.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_asking_the_ledger_never_takes_the_callers_uncommitted_work_with_it(backend: Any, table: str) -> None:
    # pool.ledger.committed() reads in a transaction of its own and rolls it
    # back. Asked on a connection with work not yet committed, it rolled that
    # work back (the first time it was asked, its CREATE of the ledger
    # committed the work instead), and the caller's commit committed nothing.
    ledger = f"ledger_ask_{backend.name}"
    backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    try:
        with Pool(backend.connect, max_size=1, ledger_table=ledger) as pool:
            for i in (1, 2):
                with pool.connection() as conn:
                    conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES ({i}, 'mine')")
                    with pytest.raises(poolkit.PoolError, match=r"ledger.committed\(\).*in a transaction"):
                        pool.ledger.committed(conn, f"req-{i}")
                    with pytest.raises(poolkit.PoolError, match=r"prune\(\).*in a transaction"):
                        pool.ledger.prune(conn, 3600)
                    conn.commit()
                    assert not pool.ledger.committed(conn, f"req-{i}")  # nothing open now: asked
            assert count(backend, table) == 2
    finally:
        backend.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_a_second_call_with_the_same_id_waits_for_the_first_and_never_runs_the_work(pg: Any, table: str) -> None:
    # A holds its id's ledger row, uncommitted, inside its work; B, with the
    # same id, must wait on that row and, once A commits, return without
    # running the work at all (not run it and roll it back).
    ledger = "ledger_same_id"
    pg.execute(f"DROP TABLE IF EXISTS {ledger}")
    in_work, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def work(name: str) -> Callable[[Any], str]:
        def fn(conn: Any) -> str:
            calls.append(name)
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES ({len(calls)}, %s)", (name,))
            if name == "A":
                in_work.set()
                assert release.wait(10)
            return name

        return fn

    results: dict[str, Any] = {}
    try:
        with Pool(pg.connect, max_size=2, ledger_table=ledger, retry=FAST) as pool:
            a = threading.Thread(target=lambda: results.setdefault("A", pool.run(work("A"), request_id="same")))
            a.start()
            assert in_work.wait(10)
            b = threading.Thread(target=lambda: results.setdefault("B", pool.run(work("B"), request_id="same")))
            b.start()
            deadline = time.monotonic() + 10
            while not pg.execute("SELECT 1 FROM pg_locks WHERE NOT granted") and time.monotonic() < deadline:
                time.sleep(0.01)  # until B waits on A's ledger row
            assert pg.execute("SELECT 1 FROM pg_locks WHERE NOT granted"), "B never waited on A's row"
            release.set()
            a.join(10)
            b.join(10)
        assert results == {"A": "A", "B": None}
        assert calls == ["A"]
        assert count(pg, table) == 1
    finally:
        release.set()
        pg.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_a_ledger_insert_is_cut_at_the_deadline_when_a_transaction_holds_its_id(
    net_backend: Any, table: str, caplog: Any
) -> None:
    # After a network partition the server keeps the lost attempt's
    # transaction open, holding its id's ledger row, until it gives up on the
    # client: hours. Another attempt with the same id must stop waiting at
    # its budget's deadline, say that the outcome is unknown, and not run the
    # work; then, once that transaction is gone, the id works as ever.
    ledger = f"ledger_held_{net_backend.name}"
    net_backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    calls: list[str] = []

    def work(conn: Any) -> str:
        calls.append("run")
        conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")
        return "done"

    holder = net_backend.connect()  # stands for the partitioned attempt
    rollback = threading.Timer(20, holder.rollback)  # without the bound the call would wait for this
    budget = Retry(attempts=3, deadline=1.5, initial_backoff=0.01, max_backoff=0.02)
    try:
        with Pool(net_backend.connect, max_size=2, ledger_table=ledger, retry=budget) as pool:
            with pool.connection() as conn:
                pool.ledger.ensure(conn)
            cur = holder.cursor()
            cur.execute(f"INSERT INTO {ledger} (request_id) VALUES (%s)", ("order-7",))  # uncommitted
            rollback.start()
            start = time.monotonic()
            with pytest.raises(AmbiguousCommitError, match="order-7"):
                pool.run(work, request_id="order-7")
            elapsed = time.monotonic() - start
            assert 1.4 <= elapsed < 3.5, elapsed  # the deadline, and the maintenance thread's wake
            assert calls == []  # the work never ran
            assert pool.stats().cuts == 1  # the waiting connection was cut, and closed
            assert pool.stats().closed_bad == 1
            assert "no answer to the ledger insert" in caplog.text

            holder.rollback()  # the server ends the lost attempt's transaction: nothing committed
            assert pool.run(work, request_id="order-7") == "done"
            assert pool.run(work, request_id="order-7") is None
            assert calls == ["run"]
        assert count(net_backend, table) == 1
    finally:
        rollback.cancel()
        holder.close()
        net_backend.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_a_ledger_insert_ended_by_the_servers_lock_timeout_keeps_its_connection(pg: Any, table: str) -> None:
    # A lock timeout of the server's own (here the session's lock_timeout)
    # ends the wait before the deadline: the outcome is as unknown, but the
    # connection is fine; each attempt meets it, until the budget is spent.
    ledger = "ledger_lock_timeout"
    pg.execute(f"DROP TABLE IF EXISTS {ledger}")

    def configure(raw: Any) -> None:
        raw.execute("SET lock_timeout = '300ms'")
        raw.commit()

    holder = pg.connect()
    budget = Retry(attempts=2, deadline=10, initial_backoff=0.01, max_backoff=0.02)
    try:
        with Pool(pg.connect, max_size=1, ledger_table=ledger, retry=budget, configure=configure) as pool:
            with pool.connection() as conn:
                pool.ledger.ensure(conn)
            holder.execute(f"INSERT INTO {ledger} (request_id) VALUES (%s)", ("order-8",))
            start = time.monotonic()
            with pytest.raises(AmbiguousCommitError, match="order-8") as info:
                pool.run(lambda conn: pytest.fail("the work ran"), request_id="order-8")
            assert 0.5 <= time.monotonic() - start < 3.0  # two attempts of 300 ms
            assert classify(info.value.__cause__).reason == "lock_timeout"
            stats = pool.stats()
            assert stats.retries == 1
            # a lock timeout says nothing against the connection (the last
            # attempt runs on a fresh one, as every last attempt does)
            assert stats.closed_bad == 0 and stats.cuts == 0
    finally:
        holder.close()
        pg.execute(f"DROP TABLE IF EXISTS {ledger}")


def test_commit_killed_with_a_request_id_lands_exactly_once(pg: Any, table: str) -> None:
    pg.execute("DROP TABLE IF EXISTS ledger_commit_killed")
    work, calls = slow_commit_work(pg, table, 2)
    try:
        with Pool(pg.connect, max_size=2, retry=FAST, ledger_table="ledger_commit_killed") as pool:
            pool.run(work, request_id="order-1")
            assert calls[0] == 2  # the ledger said the first attempt did not commit
            assert pool.stats().retries == 1
        assert count(pg, table) == 1
    finally:
        pg.execute("DROP TABLE IF EXISTS ledger_commit_killed")
