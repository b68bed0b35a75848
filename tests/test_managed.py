"""The transaction that pool.run and pool.transaction own.

``pool.run(fn)`` commits when ``fn`` returns and rolls back when it raises.
A commit of ``fn``'s own would break both of run's promises: a retry after
it would run the committed part again (a duplicated write), and with a
request id the id would commit with half the work, so the retry would find
it and skip the rest (a lost write). So the connection ``fn`` gets refuses
to end the transaction, and work that would not run inside it (an async or
generator function) is refused before it starts. Each test here fails when
that refusal is taken out: the write lands twice, half of it is lost, or
``fn``'s body never runs and the call still reports success.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import fakedb
import pytest

from poolkit import ManagedTransactionError, Pool, Retry

FAST = Retry(attempts=4, deadline=10, initial_backoff=0.01, max_backoff=0.05)


def count(backend: Any, table: str) -> int:
    return int(backend.execute(f"SELECT count(*) FROM {table}")[0][0])


# ---------------------------------------------------- on the fake driver


def test_a_commit_then_a_conflict_is_neither_sent_nor_retried(make_pool: Any, server: fakedb.Server) -> None:
    # Without the refusal: the first attempt commits "INSERT a", fails on the
    # conflict, and the retry commits it again.
    pool = make_pool(retry=FAST)
    calls = 0

    def fn(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.cursor().execute("INSERT a")
        conn.commit()
        raise fakedb.OperationalError("could not serialize access", code=40001)

    with pytest.raises(ManagedTransactionError, match=r"commit\(\) inside pool.run\(\).*Nothing was sent"):
        pool.run(fn)
    assert calls == 1
    assert server.committed == []
    assert pool.stats().closed == 0  # nothing went wrong with the connection


def test_the_refusal_is_for_the_work_of_this_call_only(make_pool: Any, server: fakedb.Server) -> None:
    # The work gives its connection back (close()) and the next checkout
    # gets the same driver connection: that caller's commit is its own.
    pool = make_pool(retry=FAST, max_size=1)
    later: list[str] = []

    def fn(conn: Any) -> None:
        conn.close()
        with pool.connection() as other:
            other.cursor().execute("INSERT other")
            other.commit()
            later.append("committed")

    with pytest.raises(ManagedTransactionError, match=r"returned to its pool inside pool.run\(\)"):
        pool.run(fn)
    assert later == ["committed"]
    assert server.committed == ["INSERT other"]
    with pool.connection() as conn:  # and after the call, commits are the caller's again
        conn.cursor().execute("INSERT after")
        conn.commit()
    assert server.committed == ["INSERT other", "INSERT after"]


def test_transaction_blocks_refuse_to_end_their_transaction(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool()
    with pytest.raises(ManagedTransactionError, match=r"rollback\(\) inside pool.transaction\(\)"):
        with pool.transaction() as conn:
            conn.cursor().execute("INSERT a")
            conn.rollback()
    with pytest.raises(ManagedTransactionError, match=r"a change of autocommit inside pool.transaction\(\)"):
        with pool.transaction() as conn:
            conn.autocommit = True
    # a refusal the block catches changes nothing: it is still one transaction
    with pool.transaction() as conn:
        conn.cursor().execute("INSERT b")
        with pytest.raises(ManagedTransactionError):
            conn.commit()
        conn.cursor().execute("INSERT c")
    assert server.committed == ["INSERT b", "INSERT c"]


async def _async_work(conn: Any) -> None:
    conn.cursor().execute("INSERT never")


def _generator_work(conn: Any) -> Iterator[int]:
    conn.cursor().execute("INSERT never")
    yield 1


class _AsyncCallable:
    async def __call__(self, conn: Any) -> None:
        conn.cursor().execute("INSERT never")


@pytest.mark.parametrize(
    "work, message",
    [
        (_async_work, "is an async function"),
        (_generator_work, "is a generator function"),
        (lambda conn: _async_work(conn), "returned a coroutine"),
        (lambda conn: _generator_work(conn), "returned a generator"),
        (_AsyncCallable(), "returned a coroutine"),
    ],
    ids=["async-def", "generator-def", "lambda-coroutine", "lambda-generator", "async-call"],
)
def test_work_that_would_run_after_the_transaction_is_refused(
    make_pool: Any, server: fakedb.Server, work: Any, message: str
) -> None:
    # Without the check run() commits an empty transaction and returns the
    # coroutine: the write never happens, and nobody is told.
    pool = make_pool(retry=FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited" either
        with pytest.raises(TypeError, match=message):
            pool.run(work)
    assert server.committed == []
    assert pool.stats().in_use == 0


def test_refused_work_is_refused_before_a_checkout(make_pool: Any) -> None:
    pool = make_pool()
    with pytest.raises(TypeError, match="async function"):
        pool.run(_async_work)
    with pytest.raises(TypeError, match="callable"):
        pool.run("INSERT")  # type: ignore[arg-type]
    assert pool.stats().acquired == 0


# ----------------------------------------------------- on real servers


def _end_it(backend: Any, how: str) -> Any:
    """What ends the transaction on this driver."""

    def end(conn: Any) -> None:
        if how == "commit":
            conn.commit()
        elif how == "rollback":
            conn.rollback()
        elif how == "begin":  # PyMySQL's begin(); MySQL commits what is open first
            conn.begin()
        elif how == "executescript":  # sqlite3's commits what is open first
            conn.executescript("SELECT 1;")
        elif how == "cursor.executescript":
            conn.cursor().executescript("SELECT 1;")
        elif backend.name == "mariadb":  # PyMySQL: a method, and SET autocommit=1 commits
            conn.autocommit(True)
        elif backend.name == "sqlite":  # sqlite3 commits when the level becomes None
            conn.isolation_level = None
        else:
            conn.autocommit = True

    return end


@pytest.mark.integration
@pytest.mark.parametrize("how", ["commit", "rollback", "autocommit"])
def test_work_cannot_end_the_transaction_on_a_real_server(backend: Any, table: str, how: str) -> None:
    _cannot_end(backend, table, how)


@pytest.mark.integration
def test_pymysql_begin_cannot_end_the_transaction(maria: Any, table: str) -> None:
    # PyMySQL's conn.begin() sends BEGIN, and MySQL commits the open
    # transaction first: the first row and the request id committed, and a
    # call again with the id skipped the rest.
    _cannot_end(maria, table, "begin")


@pytest.mark.integration
@pytest.mark.parametrize("how", ["executescript", "cursor.executescript"])
def test_sqlite_executescript_cannot_end_the_transaction(sqlite_backend: Any, table: str, how: str) -> None:
    # sqlite3's executescript() (the connection's or a cursor's) commits the
    # open transaction first: the first row committed on its own, so a retry
    # after a conflict inserted it again, and a request id committed with
    # half the work.
    _cannot_end(sqlite_backend, table, how)


@pytest.mark.integration
@pytest.mark.parametrize("sql", ["COMMIT", "ROLLBACK"])
def test_a_transaction_ended_in_sql_inside_the_work_stops_it(backend: Any, table: str, sql: str) -> None:
    # COMMIT sent as SQL in the middle of the work: the first half committed
    # on its own, the second ran outside the transaction, and a retry after
    # a conflict inserted the first half again (with a request id, the id
    # committed with half the work). The statement that ended the transaction
    # raises now, nothing more is sent, and nothing is retried. (On MySQL the
    # transaction is seen open from the first statement that needs one.)
    calls = 0

    def fn(conn: Any, first: int = 1) -> None:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} (id, v) VALUES ({first}, 'first half')")
        cur.execute(sql)
        cur.execute(f"INSERT INTO {table} (id, v) VALUES ({first + 1}, 'second half')")

    with Pool(backend.connect, max_size=1, retry=FAST) as pool:
        with pytest.raises(ManagedTransactionError, match=r"transaction of pool\.run\(\) ended inside it"):
            pool.run(fn, idempotent=False)
        assert calls == 1
        with pytest.raises(ManagedTransactionError, match=r"transaction of pool\.transaction\(\) ended"):
            with pool.transaction() as conn:
                fn(conn, first=3)
        with pool.connection() as conn:  # outside run, SQL may end what it likes
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (5, 'plain')")
            conn.cursor().execute(sql)
        pool.run(lambda conn: conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (6, 'run')"))
    ids = [row[0] for row in backend.execute(f"SELECT id FROM {table} ORDER BY id")]
    assert ids == ([1, 3, 5, 6] if sql == "COMMIT" else [6])  # each first half once; never a second half


@pytest.mark.integration
@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="sqlite3's autocommit attribute is Python 3.12+: the py313 tox environment runs this",
)
def test_sqlite_executescript_is_taken_where_it_commits_nothing(sqlite_backend: Any, table: str) -> None:
    # With autocommit=False, executescript() leaves the transaction alone
    connect = _sqlite_connect(sqlite_backend, autocommit=False)
    with Pool(connect, max_size=1, retry=FAST) as pool:
        pool.run(lambda conn: conn.executescript(f"INSERT INTO {table} (id, v) VALUES (1, 'script');"))
    assert count(sqlite_backend, table) == 1


def _sqlite_connect(backend: Any, *, autocommit: bool) -> Any:
    """A connect for ``backend``'s database in one of sqlite3's 3.12+ autocommit modes."""
    return functools.partial(
        sqlite3.connect, backend.extra["path"], check_same_thread=False, timeout=0.2, autocommit=autocommit
    )


def _cannot_end(backend: Any, table: str, how: str) -> None:
    # The work inserts a row, ends the transaction and inserts a second.
    # Without the refusal the first row commits on its own (on autocommit,
    # each does): with a request id the id commits with it, so when the rest
    # fails, a call again with the id skips the rest; without one, a conflict
    # after it has the retry insert the row again.
    ledger = f"ledger_managed_{backend.name}"
    backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    end = _end_it(backend, how)
    calls = 0

    def fn(conn: Any) -> str:
        nonlocal calls
        calls += 1
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a')")
        end(conn)
        cur.execute(f"INSERT INTO {table} (id, v) VALUES (2, 'b')")
        return "done"

    try:
        with Pool(backend.connect, max_size=1, retry=FAST, ledger_table=ledger) as pool:
            with pool.connection() as conn:
                first = conn.driver_connection
            for request_id in (None, f"req-{how}"):
                calls = 0
                with pytest.raises(ManagedTransactionError, match=r"inside pool\.run"):
                    pool.run(fn, request_id=request_id)
                assert calls == 1
                assert count(backend, table) == 0
                with pool.connection() as conn:
                    assert request_id is None or not pool.ledger.committed(conn, request_id)
                with pytest.raises(ManagedTransactionError, match=r"ledger.committed\(\), which rolls back"):
                    with pool.transaction() as conn:
                        pool.ledger.committed(conn, "req-other")
                with pytest.raises(ManagedTransactionError, match=r"inside pool\.transaction"):
                    with pool.transaction() as conn:
                        fn(conn)
                assert count(backend, table) == 0
            with pool.connection() as conn:
                assert conn.driver_connection is first  # nothing was sent: the connection is kept
            assert pool.stats().closed == 0
            # the refusal ends with the call: the same connection commits for a plain caller
            with pool.connection() as conn:
                conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (3, 'c')")
                conn.commit()
            assert count(backend, table) == 1

            # and work that does not end the transaction commits, once for its id
            def insert(conn: Any) -> str:
                conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (4, 'd')")
                return "done"

            assert pool.run(insert, request_id="ok") == "done"
            assert pool.run(insert, request_id="ok") is None
            assert count(backend, table) == 2
    finally:
        backend.execute(f"DROP TABLE IF EXISTS {ledger}")


@pytest.mark.integration
def test_async_work_with_a_request_id_records_nothing(backend: Any, table: str) -> None:
    ledger = f"ledger_async_{backend.name}"
    backend.execute(f"DROP TABLE IF EXISTS {ledger}")
    try:
        with Pool(backend.connect, max_size=1, retry=FAST, ledger_table=ledger) as pool:
            with pytest.raises(TypeError, match="returned a coroutine"):
                pool.run(lambda conn: _async_work(conn), request_id="req-async")
            with pool.connection() as conn:
                assert not pool.ledger.committed(conn, "req-async")  # so a retry of the call runs it
    finally:
        backend.execute(f"DROP TABLE IF EXISTS {ledger}")


@pytest.mark.integration
def test_sqlite_with_conn_inside_the_work_returns_it_and_commits_nothing(sqlite_backend: Any, table: str) -> None:
    # sqlite3's `with conn:` commits; a pooled connection's returns it to the
    # pool. Inside run() that rolls the work back: the call says so.
    with Pool(sqlite_backend.connect, max_size=1, retry=FAST) as pool:

        def fn(conn: Any) -> None:
            with conn:
                conn.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'a')")

        with pytest.raises(ManagedTransactionError, match="returned to its pool"):
            pool.run(fn)
    assert count(sqlite_backend, table) == 0


@pytest.mark.integration
@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="sqlite3's autocommit attribute is Python 3.12+: the py313 tox environment runs this",
)
def test_sqlite_autocommit_mode_gets_its_transactions_ended(sqlite_backend: Any, table: str) -> None:
    # In autocommit mode (autocommit=True) sqlite3's commit() and rollback()
    # do nothing. The BEGIN that run and transaction send stayed open: their
    # commit committed nothing (the writes were lost, and the calls reported
    # success), and the next borrower got the open transaction, as it got one
    # a caller began in SQL and returned.
    connect = _sqlite_connect(sqlite_backend, autocommit=True)
    with Pool(connect, max_size=1, retry=FAST) as pool:
        pool.run(lambda conn: conn.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'run')"))
        with pool.transaction() as conn:
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (2, 'transaction')")
        assert count(sqlite_backend, table) == 2  # seen from another connection: committed

        with pytest.raises(RuntimeError, match="changed my mind"), pool.transaction() as conn:
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (3, 'rolled back')")
            raise RuntimeError("changed my mind")
        with pool.connection() as conn:
            assert not conn.driver_connection.in_transaction
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (4, 'left open')")
        with pool.connection() as conn:  # the same connection: rolled back on return
            assert not conn.driver_connection.in_transaction
    assert count(sqlite_backend, table) == 2


@pytest.mark.integration
@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="sqlite3's autocommit attribute is Python 3.12+: the py313 tox environment runs this",
)
def test_sqlite_with_autocommit_false_takes_a_configure_that_commits(sqlite_backend: Any, table: str) -> None:
    # With autocommit=False sqlite3 keeps a transaction open at all times: a
    # commit() begins the next. A configure that committed was refused as
    # one that "left the connection in a transaction", with the advice to
    # commit, which it had done.
    def configure(raw: Any) -> None:
        raw.execute("CREATE TEMP TABLE configured (x INT)")
        raw.execute("INSERT INTO configured VALUES (1)")
        raw.commit()

    connect = _sqlite_connect(sqlite_backend, autocommit=False)
    with Pool(connect, max_size=1, retry=FAST, configure=configure) as pool:
        for i in range(2):  # what configure committed outlives the rollback on return
            with pool.connection() as conn:
                assert conn.execute("SELECT count(*) FROM configured").fetchone() == (1,)
            pool.run(lambda conn, i=i: conn.execute(f"INSERT INTO {table} (id, v) VALUES ({i}, 'run')"))
        assert pool.stats().created == 1
    assert count(sqlite_backend, table) == 2
