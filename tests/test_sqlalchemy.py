"""The SQLAlchemy plugin on real databases."""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from backends import MYSQL_ARGS, PG_DSN
from sqlalchemy import Column, Integer, String, create_engine, event, exc, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import QueuePool

import poolkit
import poolkit.sqlalchemy as pksa

pytestmark = pytest.mark.integration

_ids = itertools.count()


def url_for(backend: Any, tmp_path: Any) -> str:
    if backend.name == "sqlite":
        return f"sqlite:///{tmp_path}/sa.db"
    if backend.name == "postgresql":
        parts = dict(p.split("=", 1) for p in PG_DSN.split())
        return f"postgresql+psycopg://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    a = MYSQL_ARGS
    return f"mysql+pymysql://{a['user']}:{a['password']}@{a['host']}:{a['port']}/{a['database']}"


@contextlib.contextmanager
def engine_with_table(url: str, table: str, **kw: Any) -> Iterator[tuple[Any, str]]:
    """An engine, a fresh table ``(id INTEGER PRIMARY KEY)`` and the name of
    a ledger table of the test's own; all dropped after."""
    eng = create_engine(url, **kw)
    ledger = f"ledger_{table}_{next(_ids)}"
    try:
        with eng.begin() as c:
            c.execute(text(f"DROP TABLE IF EXISTS {table}"))
            c.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)"))
        yield eng, ledger
    finally:
        with eng.begin() as c:
            c.execute(text(f"DROP TABLE IF EXISTS {table}"))
            c.execute(text(f"DROP TABLE IF EXISTS {ledger}"))
        eng.dispose()


def rows(eng: Any, table: str) -> int:
    with eng.connect() as c:
        return int(c.execute(text(f"SELECT count(*) FROM {table}")).scalar())


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "poolkit_items"
    id = Column(Integer, primary_key=True, autoincrement=False)
    name = Column(String(50))


@pytest.fixture
def engine(backend: Any, tmp_path: Any) -> Any:
    eng = create_engine(url_for(backend, tmp_path) + "?plugin=poolkit&poolkit_max_size=4")
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    yield eng
    Base.metadata.drop_all(eng)
    eng.dispose()


def test_plugin_is_found_through_its_entry_point(engine: Any) -> None:
    assert isinstance(engine.pool, pksa.PoolkitPool)
    assert engine.pool.poolkit.max_size == 4
    assert "poolkit" not in str(engine.url)  # options never reach the driver


def test_core_and_orm_round_trips(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO poolkit_items (id, name) VALUES (1, 'core')"))
    with Session(engine) as s, s.begin():
        s.add(Item(id=2, name="orm"))
    with Session(engine) as s:
        assert sorted(i.name for i in s.query(Item)) == ["core", "orm"]
    st = engine.pool.poolkit.stats()
    assert st.acquired >= 3 and st.open <= 4
    assert "PoolkitPool" in engine.pool.status()


def test_keyword_options_and_unknown_options(backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(backend, tmp_path), plugins=["poolkit"], poolkit_max_size=2, poolkit_ping_after=5)
    try:
        assert eng.pool.poolkit.max_size == 2 and eng.pool.poolkit._ping_after == 5
    finally:
        eng.dispose()
    with pytest.raises(exc.ArgumentError, match=r"unknown poolkit option.*poolkit_max_sise"):
        create_engine(url_for(backend, tmp_path), plugins=["poolkit"], poolkit_max_sise=2)
    with pytest.raises(exc.ArgumentError, match="unknown poolkit option"):
        create_engine(url_for(backend, tmp_path) + "?plugin=poolkit&poolkit_nope=1")


def test_poolclass_route(backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(backend, tmp_path), poolclass=pksa.PoolkitPool, pool_size=3, pool_timeout=7)
    try:
        assert eng.pool.poolkit.max_size == 3 and eng.pool.poolkit._timeout == 7
        with eng.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
        eng.dispose()  # engine.dispose() recreates the pool
        with eng.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
        assert isinstance(eng.pool, pksa.PoolkitPool)
    finally:
        eng.dispose()


def test_server_killed_idle_connection_is_never_handed_to_a_session(net_backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(net_backend, tmp_path) + "?plugin=poolkit")
    try:
        with Session(eng) as s:
            s.execute(text("SELECT 1"))
            victim = s.connection().connection.dbapi_connection
        net_backend.kill(victim)
        with Session(eng) as s:  # no error reaches the application
            assert s.execute(text("SELECT 1")).scalar() == 1
            assert s.connection().connection.dbapi_connection is not victim
        assert eng.pool.poolkit.stats().closed_bad == 1
    finally:
        eng.dispose()


def test_read_only_after_failover_invalidates_the_pool_and_heals(net_backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(net_backend, tmp_path) + "?plugin=poolkit&poolkit_max_size=3")
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    ro = (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
        if net_backend.name == "postgresql"
        else "SET SESSION TRANSACTION READ ONLY"
    )
    try:
        # every pooled connection points at the "demoted primary"
        conns = [eng.connect() for _ in range(3)]
        for c in conns:
            c.execute(text(ro))
            c.commit()
        for c in conns:
            c.close()
        with pytest.raises(exc.DBAPIError) as info:  # the first write fails with the read-only error
            with Session(eng) as s, s.begin():
                s.add(Item(id=1, name="x"))
        assert poolkit.classify(info.value).category is poolkit.Category.NOT_LEADER
        assert eng.pool.poolkit.stats().generation == 1  # the whole pool was invalidated
        with Session(eng) as s, s.begin():  # the next write succeeds on a fresh connection
            s.add(Item(id=2, name="after"))
        with Session(eng) as s:
            assert [i.id for i in s.query(Item)] == [2]
    finally:
        Base.metadata.drop_all(eng)
        eng.dispose()


def _event_log(engine: Any) -> list[str]:
    log: list[str] = []
    for name in ("connect", "first_connect", "checkout", "checkin", "reset", "invalidate", "close"):

        def listener(*args: Any, _n: str = name) -> None:
            log.append(_n)

        event.listen(engine.pool, name, listener)
    return log


def test_pool_events_fire_as_with_queuepool(tmp_path: Any, sqlite_backend: Any) -> None:
    def sequence(poolclass: Any, path: str) -> list[str]:
        eng = create_engine(f"sqlite:///{path}", poolclass=poolclass, pool_size=2)
        log = _event_log(eng)
        c = eng.connect()
        c.execute(text("SELECT 1"))
        c.close()
        c = eng.connect()
        c.invalidate()
        c.close()
        c = eng.connect()
        c.execute(text("SELECT 1"))
        c.close()
        eng.dispose()
        return log

    expected = sequence(QueuePool, str(tmp_path / "q.db"))
    got = sequence(pksa.PoolkitPool, str(tmp_path / "p.db"))
    assert got == expected
    assert expected.count("connect") == 2 and "invalidate" in expected


def test_what_connect_listeners_set_survives_reset_session(net_backend: Any, tmp_path: Any) -> None:
    # The driver's reset puts the session's settings back to the server's
    # defaults, and with them what SQLAlchemy's connect listeners set: the
    # application's own, and on MySQL the dialect's isolation level (a SET
    # SESSION). From the second checkout on, a SERIALIZABLE engine ran
    # REPEATABLE-READ transactions. The plugin runs the listeners again.
    if net_backend.name == "postgresql":
        setting, show, want = "SET search_path TO pg_catalog", "SHOW search_path", "pg_catalog"
        isolation = "SHOW transaction_isolation"
    else:
        setting, show, want = "SET time_zone = '+03:00'", "SELECT @@session.time_zone", "+03:00"
        isolation = "SELECT @@session.tx_isolation"
    url = url_for(net_backend, tmp_path) + "?plugin=poolkit&poolkit_max_size=1&poolkit_reset_session=true"
    eng = create_engine(url, isolation_level="SERIALIZABLE")
    opened: list[Any] = []

    @event.listens_for(eng, "connect")
    def configure(dbapi_conn: Any, record: Any) -> None:
        opened.append(dbapi_conn)
        cur = dbapi_conn.cursor()
        cur.execute(setting)
        cur.close()
        dbapi_conn.commit()

    try:
        for _ in range(3):
            with eng.connect() as c:
                assert c.execute(text(show)).scalar() == want
                assert c.execute(text(isolation)).scalar().lower() == "serializable"
                c.exec_driver_sql(setting.replace("pg_catalog", "public").replace("+03:00", "+05:00"))
                c.commit()  # this checkout's own: the reset takes it away
        assert len(opened) == 3 and all(d is opened[0] for d in opened)  # one connection, reset and set up again
    finally:
        eng.dispose()


def test_a_connect_listener_that_leaves_a_transaction_open_is_refused(pg: Any, tmp_path: Any) -> None:
    # A connect listener that sets the session up without committing: with
    # QueuePool the first checkout saw the setting and its rollback on return
    # took it away from every later one, with nothing said. The plugin
    # refuses the connection, naming the listener and the fix.
    eng = create_engine(url_for(pg, tmp_path) + "?plugin=poolkit&poolkit_max_size=1&poolkit_timeout=5")

    @event.listens_for(eng, "connect")
    def set_search_path(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("SET search_path TO pg_catalog")
        cur.close()

    try:
        with pytest.raises(ValueError, match=r"the engine's connect event listener left the new connection in a tran"):
            eng.connect()
    finally:
        eng.dispose()


def test_a_write_on_a_read_only_engine_is_the_callers_mistake_not_a_failover(
    pg: Any, table: str, tmp_path: Any
) -> None:
    # postgresql_readonly=True makes psycopg begin READ ONLY: a write is
    # refused with 25006 on any node. It was NOT_LEADER: the plugin
    # invalidated the whole pool for it, and run() retried it to no avail.
    eng = create_engine(url_for(pg, tmp_path) + "?plugin=poolkit&poolkit_max_size=2")
    read_only = eng.execution_options(postgresql_readonly=True)
    calls = 0

    def write(conn: Any) -> None:
        nonlocal calls
        calls += 1
        conn.execute(text(f"INSERT INTO {table} (id, v) VALUES (1, 'x')"))

    try:
        with pytest.raises(exc.DBAPIError, match="read-only transaction"):
            pksa.run(read_only, write, retry=poolkit.Retry(attempts=3, initial_backoff=0.01))
        assert calls == 1
        st = eng.pool.poolkit.stats()
        assert (st.generation, st.closed, st.retries) == (0, 0, 0)
        pksa.run(eng, write)  # the same pool writes, as before
    finally:
        eng.dispose()
    assert pg.execute(f"SELECT count(*) FROM {table}")[0][0] == 1


def test_retry_helper_survives_a_kill_between_attempts_and_never_applies_twice(pg: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(pg, tmp_path) + "?plugin=poolkit", pool_reset_on_return=None)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    SessionF = sessionmaker(bind=eng)
    try:
        calls = 0

        def add(session: Session) -> None:
            nonlocal calls
            calls += 1
            session.add(Item(id=7, name="once"))
            session.flush()
            if calls == 1:
                pg.kill(session.connection().connection.dbapi_connection)  # the commit will find it dead

        # non-idempotent, no request id: the outcome is unknown, so nothing is retried
        with pytest.raises(poolkit.AmbiguousCommitError):
            pksa.run(SessionF, add, retry=poolkit.Retry(attempts=5, initial_backoff=0.01))
        assert calls == 1
        with Session(eng) as s:
            assert s.query(Item).count() == 0  # the server rolled it back
        # with a request id the same thing is retried safely: exactly one row
        calls = 0
        rid = f"sa-{next(_ids)}-{id(eng)}"
        pksa.run(SessionF, add, request_id=rid, retry=poolkit.Retry(attempts=5, initial_backoff=0.01))
        assert calls == 2
        assert pksa.run(SessionF, add, request_id=rid) is None  # a finished id never runs again
        assert calls == 2
        with Session(eng) as s:
            assert [i.name for i in s.query(Item)] == ["once"]
    finally:
        Base.metadata.drop_all(eng)
        with eng.begin() as c:
            c.execute(text("DROP TABLE IF EXISTS poolkit_requests"))
        eng.dispose()


def test_retry_helper_retries_idempotent_core_work_a_lost_connection_at_once_a_second_after_a_wait(
    net_backend: Any, tmp_path: Any, caplog: Any, retry_waits: Any
) -> None:
    eng = create_engine(url_for(net_backend, tmp_path) + "?plugin=poolkit")
    try:
        calls = 0

        def read(conn: Any) -> int:
            nonlocal calls
            calls += 1
            if calls <= 2:
                net_backend.kill(conn.connection.dbapi_connection)
            return int(conn.execute(text("SELECT 41 + 1")).scalar())

        budget = poolkit.Retry(attempts=4, deadline=20, initial_backoff=0.3, max_backoff=0.3)
        with caplog.at_level("WARNING", logger="poolkit.sqlalchemy"):
            assert pksa.run(eng, read, idempotent=True, retry=budget) == 42
        assert calls == 3
        assert retry_waits("poolkit.sqlalchemy") == [0.0, 0.3]  # as pool.run: see test_run.py
        with pytest.raises(TypeError, match="Engine or a sessionmaker"):
            pksa.run("nope", read)
    finally:
        eng.dispose()


def test_a_ledger_insert_is_cut_at_the_deadline_through_the_plugin(net_backend: Any, tmp_path: Any) -> None:
    # pksa.run bounds the ledger insert's wait as pool.run does (see
    # test_integration_errors): a transaction holding the id, left open by a
    # partitioned attempt, costs the call its deadline, not hours.
    eng = create_engine(url_for(net_backend, tmp_path) + "?plugin=poolkit")
    ledger = f"ledger_sa_held_{next(_ids)}"
    budget = poolkit.Retry(attempts=3, deadline=1.5, initial_backoff=0.01, max_backoff=0.02)
    holder = net_backend.connect()
    rollback = threading.Timer(20, holder.rollback)  # without the bound the call would wait for this
    calls: list[str] = []

    def work(conn: Any) -> str:
        calls.append("run")
        return "done"

    try:
        with eng.begin() as c:
            c.execute(text(poolkit.Ledger(ledger).create_sql))
        cur = holder.cursor()
        cur.execute(f"INSERT INTO {ledger} (request_id) VALUES (%s)", ("sa-7",))  # uncommitted
        rollback.start()
        for bind in (eng, sessionmaker(eng)):
            start = time.monotonic()
            with pytest.raises(poolkit.AmbiguousCommitError, match="sa-7"):
                pksa.run(bind, work, request_id="sa-7", ledger_table=ledger, retry=budget)
            assert 1.4 <= time.monotonic() - start < 3.5
        assert calls == []
        assert eng.pool.poolkit.stats().cuts == 2  # type: ignore[attr-defined]
        holder.rollback()
        assert pksa.run(eng, work, request_id="sa-7", ledger_table=ledger, retry=budget) == "done"
        assert calls == ["run"]
    finally:
        rollback.cancel()
        holder.close()
        with eng.begin() as c:
            c.execute(text(f"DROP TABLE IF EXISTS {ledger}"))
        eng.dispose()


def test_an_isolation_level_through_the_engine_applies_with_a_request_id(pg: Any, tmp_path: Any) -> None:
    # the README's recipe: SQLAlchemy sets the level on checkout, before the
    # ledger's insert opens the transaction; the next one has the server's own
    eng = create_engine(url_for(pg, tmp_path) + "?plugin=poolkit", pool_size=1)
    ledger = f"ledger_sa_iso_{next(_ids)}"

    def level(conn: Any) -> str:
        return str(conn.execute(text("SELECT current_setting('transaction_isolation')")).scalar())

    try:
        serializable = eng.execution_options(isolation_level="SERIALIZABLE")
        assert pksa.run(serializable, level, request_id="iso-1", ledger_table=ledger) == "serializable"
        assert pksa.run(sessionmaker(serializable), level, request_id="iso-2", ledger_table=ledger) == "serializable"
        assert pksa.run(eng, level, request_id="iso-3", ledger_table=ledger) == "read committed"
    finally:
        with eng.begin() as c:
            c.execute(text(f"DROP TABLE IF EXISTS {ledger}"))
        eng.dispose()


def test_core_work_with_a_request_id_runs_once_on_every_backend(backend: Any, tmp_path: Any) -> None:
    with engine_with_table(url_for(backend, tmp_path) + "?plugin=poolkit", "sa_core_once") as (eng, ledger):
        calls = 0

        def insert(conn: Any) -> str:
            nonlocal calls
            calls += 1
            conn.execute(text(f"INSERT INTO sa_core_once (id) VALUES ({calls})"))
            return "done"

        assert pksa.run(eng, insert, request_id="core-1", ledger_table=ledger) == "done"
        assert pksa.run(eng, insert, request_id="core-1", ledger_table=ledger) is None  # never run again
        assert calls == 1
        assert rows(eng, "sa_core_once") == 1


def test_a_failover_creator_moves_off_a_demoted_primary(pg: Any, tmp_path: Any) -> None:
    import psycopg

    opened: list[str] = []

    def old_primary() -> Any:  # up, but read-only now
        opened.append("old")
        return psycopg.connect(PG_DSN, options="-c default_transaction_read_only=on")

    def new_primary() -> Any:
        opened.append("new")
        return psycopg.connect(PG_DSN)

    eng = create_engine(
        "postgresql+psycopg://", creator=poolkit.failover(old_primary, new_primary), plugins=["poolkit"]
    )
    try:
        with eng.begin():
            pass  # the first connection: to the old primary, which answers
        assert opened == ["old"]

        def write(conn: Any) -> int:
            conn.execute(text("CREATE TEMPORARY TABLE t_failover (id INTEGER)"))
            return 1

        assert pksa.run(eng, write, retry=poolkit.Retry(attempts=4, initial_backoff=0.01)) == 1
        assert opened[-1] == "new" and opened.count("old") == 1  # refused once, then the next node
    finally:
        eng.dispose()


def test_the_pymysql_tls_advice_reaches_engine_users_and_connect_args_silence_it(
    maria: Any, tmp_path: Any, caplog: Any
) -> None:
    """Through SQLAlchemy's connection records (the delegating driver): the
    advice names the connect_args that silence it, and they do."""
    from pymysql.constants import CLIENT

    offers_tls = bool(maria.admin.server_capabilities & CLIENT.SSL)  # then the context is used: no advice
    caplog.set_level("WARNING", logger="poolkit.pool")
    url = url_for(maria, tmp_path) + "?plugin=poolkit"
    for connect_args, expected in (({}, 0 if offers_tls else 1), ({"ssl_disabled": True}, 0)):
        caplog.clear()
        eng = create_engine(url, connect_args=connect_args)
        try:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            eng.dispose()
        advice = [r.getMessage() for r in caplog.records if "connect_args={'ssl_disabled': True}" in r.getMessage()]
        assert len(advice) == expected, (connect_args, caplog.text)


# -------------------------------------- the transaction run() owns


@pytest.mark.parametrize("pool", ["poolkit", "queuepool"])
def test_run_refuses_a_commit_inside_the_work_and_leaves_no_open_transaction(
    backend: Any, tmp_path: Any, pool: str
) -> None:
    # The work inserts, commits, inserts again. Without the refusal the first
    # row and the request id commit, and a call again with the id skips the
    # rest. SQLAlchemy has marked its transaction ended when the commit event
    # fires, and would put the connection back in its pool with the insert
    # still open: a later user's commit would commit it. run() discards it.
    url = url_for(backend, tmp_path) + ("?plugin=poolkit" if pool == "poolkit" else "")
    with engine_with_table(url, "sa_managed", pool_size=1, max_overflow=0) as (eng, ledger):
        for bind in (eng, sessionmaker(eng), eng.execution_options(isolation_level="SERIALIZABLE")):
            for swallow in (False, True):
                calls = 0

                def work(c: Any, swallow: bool = swallow) -> str:
                    nonlocal calls
                    calls += 1
                    c.execute(text("INSERT INTO sa_managed (id) VALUES (1)"))
                    try:
                        c.commit()
                    except poolkit.ManagedTransactionError:
                        if not swallow:
                            raise
                    c.execute(text("INSERT INTO sa_managed (id) VALUES (2)"))
                    return "done"

                rid = f"managed-{next(_ids)}"
                match = "went on when it was refused" if swallow else r"commit\(\) inside poolkit.sqlalchemy.run"
                with pytest.raises(poolkit.ManagedTransactionError, match=match):
                    pksa.run(bind, work, request_id=rid, ledger_table=ledger)
                assert calls == 1
                with eng.connect() as c:  # the pool's one connection: a later user commits
                    c.execute(text("SELECT 1"))
                    c.commit()
                assert rows(eng, "sa_managed") == 0
                assert rows(eng, ledger) == 0
        # a commit outside run(), on the same engine, is the caller's own
        with eng.connect() as c:
            c.execute(text("INSERT INTO sa_managed (id) VALUES (3)"))
            c.commit()
        assert rows(eng, "sa_managed") == 1


def test_run_refuses_an_autocommit_engine(backend: Any, tmp_path: Any) -> None:
    # On AUTOCOMMIT each statement commits as it runs: a failed attempt left
    # its first insert and its request id committed, and a call again with
    # the id returned None without the rest.
    with engine_with_table(url_for(backend, tmp_path) + "?plugin=poolkit", "sa_autocommit") as (eng, ledger):
        auto = eng.execution_options(isolation_level="AUTOCOMMIT")
        calls = 0

        def work(c: Any) -> None:
            nonlocal calls
            calls += 1
            c.execute(text("INSERT INTO sa_autocommit (id) VALUES (1)"))
            raise ValueError("the rest failed")

        for bind in (auto, sessionmaker(auto)):
            with pytest.raises(exc.ArgumentError, match="AUTOCOMMIT"):
                pksa.run(bind, work, request_id="auto-1", ledger_table=ledger)
        assert calls == 0
        assert rows(eng, "sa_autocommit") == 0
        # a level that has transactions is the fix the error names
        level = "SERIALIZABLE" if backend.name == "sqlite" else "READ COMMITTED"
        fixed = eng.execution_options(isolation_level=level)
        assert pksa.run(fixed, lambda c: 7, request_id="auto-2", ledger_table=ledger) == 7
        assert rows(eng, ledger) == 1


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="sqlite3's autocommit attribute is Python 3.12+: the py313 tox environment runs this",
)
@pytest.mark.parametrize("pool", ["poolkit", "queuepool"])
def test_run_refuses_a_sqlite3_connection_in_autocommit_mode(sqlite_backend: Any, tmp_path: Any, pool: str) -> None:
    # sqlite3's commit() does nothing with autocommit=True: the BEGIN that
    # run sends on SQLite stayed open, SQLAlchemy's commit committed nothing,
    # and run returned as if the insert had landed (it had not).
    url = url_for(sqlite_backend, tmp_path) + ("?plugin=poolkit" if pool == "poolkit" else "")
    with engine_with_table(url, "sa_sqlite_ac", connect_args={"autocommit": True}) as (eng, _):
        calls = 0

        def work(c: Any) -> None:
            nonlocal calls
            calls += 1
            c.execute(text("INSERT INTO sa_sqlite_ac (id) VALUES (1)"))

        for bind in (eng, sessionmaker(eng)):
            with pytest.raises(exc.ArgumentError, match=r"autocommit mode \(autocommit=True\)"):
                pksa.run(bind, work)
        assert calls == 0
    with engine_with_table(url, "sa_sqlite_ac", connect_args={"autocommit": False}) as (eng, _):
        pksa.run(eng, work)  # the fix the error names
        assert calls == 1 and rows(eng, "sa_sqlite_ac") == 1


def test_run_refuses_async_work(sqlite_backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(sqlite_backend, tmp_path) + "?plugin=poolkit")

    async def work(c: Any) -> None:
        c.execute(text("SELECT 1"))

    try:
        with pytest.raises(TypeError, match="async function"):
            pksa.run(eng, work)
        with pytest.raises(TypeError, match="returned a coroutine"):
            pksa.run(sessionmaker(eng), lambda s: work(s))
        assert eng.pool.poolkit.stats().in_use == 0
    finally:
        eng.dispose()


def test_run_refuses_bad_call_options_before_any_checkout(sqlite_backend: Any, tmp_path: Any) -> None:
    eng = create_engine(url_for(sqlite_backend, tmp_path) + "?plugin=poolkit")
    calls: list[int] = []
    try:
        with pytest.raises(TypeError, match="idempotent must be True or False, not str 'false'"):
            pksa.run(eng, lambda c: calls.append(1), idempotent="false")
        with pytest.raises(TypeError, match="request_id must be a str or None, not int"):
            pksa.run(eng, lambda c: calls.append(1), request_id=7)
        assert calls == [] and eng.pool.poolkit.stats().acquired == 0
    finally:
        eng.dispose()


def test_a_run_nested_in_a_run_that_holds_every_connection_fails_at_once(sqlite_backend: Any, tmp_path: Any) -> None:
    # The outer run holds the pool's one connection: the nested run waited
    # for it the whole timeout, then timed out.
    eng = create_engine(url_for(sqlite_backend, tmp_path) + "?plugin=poolkit&poolkit_max_size=1&poolkit_timeout=30")
    try:
        t0 = time.monotonic()
        for bind in (eng, sessionmaker(eng)):
            with pytest.raises(exc.TimeoutError, match="holds every one of its connections"):
                pksa.run(bind, lambda c: pksa.run(eng, lambda inner: None))
        assert time.monotonic() - t0 < 5
        assert pksa.run(eng, lambda c: 7) == 7  # and the pool is whole
    finally:
        eng.dispose()


def test_a_session_whose_connect_fails_is_retried_as_a_checkout(pg: Any, tmp_path: Any) -> None:
    # A session checks out its connection on first use; run() now takes it
    # before the work, as the checkout it is: a connect refused there (a
    # server restarting) sent nothing, so it is retried even for work that
    # is neither idempotent nor under a request id. It was raised, as a
    # loss in the middle of the work. (On a QueuePool engine: poolkit's own
    # pool tries a refused connect again by itself, within its timeout.)
    import psycopg

    opened: list[str] = []

    def creator() -> Any:
        if not opened:
            opened.append("refused")
            return psycopg.connect("host=127.0.0.1 port=1 dbname=test user=postgres", connect_timeout=2)
        opened.append("ok")
        return psycopg.connect(PG_DSN)

    eng = create_engine("postgresql+psycopg://", creator=creator)
    try:
        assert pksa.run(sessionmaker(eng), lambda s: s.execute(text("SELECT 41 + 1")).scalar()) == 42
        assert opened == ["refused", "ok"]
    finally:
        eng.dispose()


@pytest.mark.parametrize("pool", ["poolkit", "queuepool"])
def test_sqlite_reads_before_the_first_write_are_in_runs_transaction(
    sqlite_backend: Any, tmp_path: Any, pool: str
) -> None:
    # As with pool.run: pysqlite begins only before a write, so two runs that
    # read then wrote a counter lost an update.
    url = url_for(sqlite_backend, tmp_path) + ("?plugin=poolkit" if pool == "poolkit" else "")
    with engine_with_table(url, "sa_counter", connect_args={"timeout": 5}) as (eng, _):
        with eng.begin() as c:
            c.execute(text("INSERT INTO sa_counter (id) VALUES (0)"))
        for bind in (eng, sessionmaker(eng)):
            both_read = threading.Barrier(2)
            attempts: list[int] = []

            def increment(c: Any, both_read: threading.Barrier = both_read, attempts: list[int] = attempts) -> None:
                attempts.append(1)
                v = c.execute(text("SELECT max(id) FROM sa_counter")).scalar()
                if len(attempts) <= 2:
                    with contextlib.suppress(threading.BrokenBarrierError):
                        both_read.wait(timeout=5)
                c.execute(text("UPDATE sa_counter SET id = :v"), {"v": v + 1})

            retry = poolkit.Retry(attempts=10, initial_backoff=0.01, max_backoff=0.05)
            threads = [threading.Thread(target=pksa.run, args=(bind, increment), kwargs={"retry": retry})]
            threads.append(threading.Thread(target=pksa.run, args=(bind, increment), kwargs={"retry": retry}))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(attempts) >= 3  # one was retried
        with eng.connect() as c:
            assert c.execute(text("SELECT id FROM sa_counter")).scalar() == 4


def test_the_ledger_table_is_created_once_per_engine(sqlite_backend: Any, tmp_path: Any) -> None:
    # CREATE TABLE IF NOT EXISTS, in a transaction of its own, ran before
    # every call with a request id (about 700 us on PostgreSQL here).
    with engine_with_table(url_for(sqlite_backend, tmp_path) + "?plugin=poolkit", "sa_once") as (eng, ledger):
        creates: list[str] = []
        event.listen(
            eng,
            "before_cursor_execute",
            lambda conn, cur, statement, *a: creates.append(statement) if statement.startswith("CREATE") else None,
        )
        for n in range(4):
            # the last two as the README suggests for an isolation level: a
            # new engine each call, which shares its root's ledger
            bind = eng if n < 2 else eng.execution_options(isolation_level="SERIALIZABLE")
            pksa.run(
                bind,
                lambda c, n=n: c.execute(text(f"INSERT INTO sa_once (id) VALUES ({n})")),
                request_id=f"o{n}",
                ledger_table=ledger,
            )
        assert len(creates) == 1 and ledger in creates[0]
        assert rows(eng, "sa_once") == 4
