"""The DB-API drop-in.

A conformance suite runs each check once against the raw driver module and
once against the drop-in; a check returns what it observed (values, or the
exception class it got), and the drop-in must observe exactly what the raw
driver does.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from backends import MYSQL_ARGS, PG_DSN

import poolkit.dbapi

pytestmark = pytest.mark.integration

_names = itertools.count()


class Target:
    """A driver module, how to connect to the test database, and its SQL dialect bits."""

    def __init__(self, name: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ph: str) -> None:
        self.name = name
        self.module = module
        self.args = args
        self.kwargs = kwargs
        self.ph = ph

    def connect(self, module: Any) -> Any:
        return module.connect(*self.args, **self.kwargs)


@pytest.fixture(params=["sqlite3", "psycopg", "pymysql"])
def target(request: Any, tmp_path: Any) -> Any:
    from conftest import _open_backend

    if request.param == "sqlite3":
        import sqlite3

        yield Target("sqlite3", sqlite3, (str(tmp_path / "c.db"),), {"check_same_thread": False}, "?")
        return
    backend = _open_backend("postgresql" if request.param == "psycopg" else "mariadb", tmp_path)
    backend.close()
    if request.param == "psycopg":
        import psycopg

        yield Target("psycopg", psycopg, (PG_DSN,), {}, "%s")
    else:
        import pymysql

        yield Target("pymysql", pymysql, (), dict(MYSQL_ARGS), "%s")


def observe(fn: Callable[[], Any]) -> Any:
    """What calling ``fn`` shows: its value, or the exception class and message."""
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


# ------------------------------------------------------------------ checks


def check_module_globals(t: Target, m: Any) -> Any:
    return (m.apilevel, m.threadsafety, m.paramstyle)


def check_exception_hierarchy(t: Target, m: Any) -> Any:
    out = []
    for name in (
        "Warning",
        "Error",
        "InterfaceError",
        "DatabaseError",
        "DataError",
        "OperationalError",
        "IntegrityError",
        "InternalError",
        "ProgrammingError",
        "NotSupportedError",
    ):
        cls = getattr(m, name)
        out.append((name, cls is getattr(t.module, name), issubclass(cls, Exception)))
    out.append(issubclass(m.OperationalError, m.DatabaseError) and issubclass(m.DatabaseError, m.Error))
    return out


def check_exceptions_on_connection(t: Target, m: Any) -> Any:
    c = t.connect(m)
    try:
        return [
            getattr(c, "Error", None) is t.module.Error,
            getattr(c, "OperationalError", None) is t.module.OperationalError,
        ]
    finally:
        c.close()


def check_type_objects_and_constructors(t: Target, m: Any) -> Any:
    names = ["STRING", "BINARY", "NUMBER", "DATETIME", "ROWID", "Date", "Time", "Timestamp", "Binary"]
    present = [n for n in names if hasattr(m, n)]
    values = [repr(m.Date(2020, 1, 2)), repr(m.Timestamp(2020, 1, 2, 3, 4, 5))]
    return present, values


def _table(t: Target, m: Any) -> str:
    name = f"conf_{t.name}_{os.getpid()}_{next(_names)}"
    c = t.connect(m)
    cur = c.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {name}")
    cur.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, v VARCHAR(20))")
    c.commit()
    c.close()
    return name


def check_commit_and_rollback(t: Target, m: Any) -> Any:
    table = _table(t, m)
    a = t.connect(m)
    cur = a.cursor()
    cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'rolled back')")
    a.rollback()
    cur.execute(f"INSERT INTO {table} (id, v) VALUES (2, 'committed')")
    a.commit()
    a.close()
    b = t.connect(m)
    cur = b.cursor()
    cur.execute(f"SELECT id, v FROM {table} ORDER BY id")
    rows = [tuple(r) for r in cur.fetchall()]
    b.close()
    return rows


def check_uncommitted_work_is_discarded_on_close(t: Target, m: Any) -> Any:
    table = _table(t, m)
    a = t.connect(m)
    a.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'x')")
    a.close()
    b = t.connect(m)
    cur = b.cursor()
    cur.execute(f"SELECT count(*) FROM {table}")
    n = cur.fetchone()[0]
    b.close()
    return n


def check_cursor_isolation(t: Target, m: Any) -> Any:
    c = t.connect(m)
    c1, c2 = c.cursor(), c.cursor()
    c1.execute("SELECT 1")
    c2.execute("SELECT 2")
    out = (tuple(c1.fetchone()), tuple(c2.fetchone()))
    c.close()
    return out


def check_description_and_rowcount(t: Target, m: Any) -> Any:
    table = _table(t, m)
    c = t.connect(m)
    cur = c.cursor()
    cur.executemany(f"INSERT INTO {table} (id, v) VALUES ({t.ph}, {t.ph})", [(1, "a"), (2, "b"), (3, "c")])
    rc = cur.rowcount
    c.commit()
    cur.execute(f"SELECT id, v FROM {table} ORDER BY id")
    desc = [(d[0], len(d)) for d in cur.description]
    c.close()
    return rc, desc


def check_fetch_methods(t: Target, m: Any) -> Any:
    table = _table(t, m)
    c = t.connect(m)
    cur = c.cursor()
    for i in range(5):
        cur.execute(f"INSERT INTO {table} (id, v) VALUES ({t.ph}, {t.ph})", (i, f"v{i}"))
    c.commit()
    cur.execute(f"SELECT id FROM {table} ORDER BY id")
    one = tuple(cur.fetchone())
    many = [tuple(r) for r in cur.fetchmany(2)]
    rest = [tuple(r) for r in cur.fetchall()]
    cur.execute(f"SELECT id FROM {table} ORDER BY id")
    iterated = [tuple(r) for r in cur]
    cur.arraysize = 2
    cur.execute(f"SELECT id FROM {table} ORDER BY id")
    sized = len(cur.fetchmany())
    none_left = (cur.fetchall(), cur.fetchone())
    c.close()
    return one, many, rest, iterated, sized, [list(x) if x is not None else None for x in none_left]


def check_errors_are_the_drivers(t: Target, m: Any) -> Any:
    c = t.connect(m)
    cur = c.cursor()
    out = observe(lambda: cur.execute("SELEC nonsense"))
    try:
        cur.execute("SELEC nonsense")
    except t.module.Error as exc:  # the driver's own class catches it
        caught = type(exc).__name__
    c.close()
    return out[0], out[1], caught


def check_close_semantics(t: Target, m: Any) -> Any:
    c = t.connect(m)
    cur = c.cursor()
    cur.execute("SELECT 1")
    c.close()
    return [
        observe(lambda: c.cursor() and None),
        observe(c.commit),
        observe(c.rollback),
        observe(lambda: cur.execute("SELECT 1") and None),
        observe(lambda: c.cursor().execute("SELECT 1") and None),
        observe(c.close),  # a second close: as the driver does
    ]


def check_context_managers(t: Target, m: Any) -> Any:
    table = _table(t, m)
    c = t.connect(m)
    with c:
        c.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'ctx')")
    after = observe(lambda: c.cursor().execute("SELECT 1") and None)  # closed by `with` (psycopg, PyMySQL) or not
    if after[0] == "ok":
        c.close()
    d = t.connect(m)
    cur = d.cursor()
    cur.execute(f"SELECT count(*) FROM {table}")
    committed = cur.fetchone()[0]
    has_cursor_ctx = hasattr(type(cur), "__enter__")
    d.close()
    return after[0], committed, has_cursor_ctx


def check_settings_do_not_outlive_the_connection(t: Target, m: Any) -> Any:
    # A new driver connection starts with the driver's defaults: a pooled one
    # must too, whatever the last user set (an uncommitted write must not be
    # committed by a previous user's autocommit).
    table = _table(t, m)
    c = t.connect(m)
    if t.name == "sqlite3":
        c.isolation_level = None
        c.row_factory = t.module.Row
    elif t.name == "pymysql":
        c.autocommit(True)
    else:
        c.autocommit = True
        c.read_only = True
    c.cursor().execute(f"SELECT count(*) FROM {table}")
    if t.name != "psycopg":  # read-only there
        c.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (1, 'autocommitted')")
    c.close()
    d = t.connect(m)
    if t.name == "sqlite3":
        settings = (d.isolation_level, d.row_factory)
    elif t.name == "pymysql":
        settings = (d.get_autocommit(),)
    else:
        settings = (d.autocommit, d.read_only)
    d.cursor().execute(f"INSERT INTO {table} (id, v) VALUES (2, 'uncommitted')")
    d.close()
    e = t.connect(m)
    cur = e.cursor()
    cur.execute(f"SELECT id FROM {table} ORDER BY id")
    rows = [tuple(r) for r in cur.fetchall()]
    e.close()
    return settings, rows


def check_attributes_of_ones_own(t: Target, m: Any) -> Any:
    # refused by a driver whose connections take none (sqlite3), else kept
    # for that connection only
    c = t.connect(m)
    out = [observe(lambda: setattr(c, "poolkit_tag", 1)), observe(lambda: c.poolkit_tag)]
    c.close()
    d = t.connect(m)
    out.append(observe(lambda: d.poolkit_tag))
    d.close()
    return out


CHECKS = [v for k, v in sorted(globals().items()) if k.startswith("check_")]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[6:])
def test_drop_in_observes_what_the_raw_driver_observes(target: Target, check: Callable[..., Any]) -> None:
    raw = check(target, target.module)
    dropin = poolkit.dbapi.wrap(target.module, max_size=4)
    try:
        pooled = check(target, dropin)
    finally:
        dropin.close_all()
    assert pooled == raw


# ------------------------------------------------------------------ the rest


def test_connections_with_the_same_arguments_share_a_pool(tmp_path: Any) -> None:
    import sqlite3

    m = poolkit.dbapi.wrap(sqlite3)
    try:
        path = str(tmp_path / "a.db")
        for _ in range(5):
            c = m.connect(path, check_same_thread=False)
            c.execute("SELECT 1")
            c.close()
        other = m.connect(str(tmp_path / "b.db"), check_same_thread=False)
        other.close()
        pools = m.pools()
        assert len(pools) == 2
        first = next(p for k, p in pools.items() if path in repr(k))
        s = first.stats()
        assert s.created == 1 and s.acquired == 5
    finally:
        m.close_all()


def test_sqlite3_needs_no_check_same_thread_and_an_explicit_true_is_refused(tmp_path: Any) -> None:
    # Changing one import is all it takes: sqlite3's default
    # check_same_thread=True failed at the first connect (the pool opens it
    # in a thread of its own, and checks it from another).
    import sqlite3

    m = poolkit.dbapi.wrap(sqlite3)
    path = str(tmp_path / "a.db")
    try:
        c = m.connect(path)
        c.execute("CREATE TABLE t (x INTEGER)")
        c.commit()
        c.close()
        seen: list[Any] = []

        def elsewhere() -> None:
            c = m.connect(path)
            seen.append(c.execute("SELECT count(*) FROM t").fetchone())
            c.close()

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert seen == [(0,)]
        assert next(iter(m.pools().values())).stats().created == 1  # the same connection, in another thread
        with pytest.raises(ValueError, match=r"check_same_thread=False"):
            m.connect(path, check_same_thread=True)  # said so: refused, not overridden
        with pytest.raises(ValueError, match=r"check_same_thread=False"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.13: keyword-only from 3.15 on
            m.connect(str(tmp_path / "b.db"), 5.0, 0, "DEFERRED", True)  # said so by position
    finally:
        m.close_all()


def test_pool_options_per_target_never_reach_the_driver(tmp_path: Any) -> None:
    import sqlite3

    m = poolkit.dbapi.wrap(sqlite3)
    try:
        path = str(tmp_path / "a.db")
        c = m.connect(path, check_same_thread=False, poolkit={"max_size": 1, "name": "one", "timeout": 0.05})
        pool = next(iter(m.pools().values()))
        assert pool.max_size == 1 and pool.name == "one"
        with pytest.raises(poolkit.PoolTimeout):
            m.connect(path, check_same_thread=False)  # same target, same pool: full
        c.close()
        with pytest.raises(ValueError, match="exists already"):
            m.connect(path, check_same_thread=False, poolkit={"max_size": 3})
        with pytest.raises(TypeError, match="dict of pool options"):
            m.connect(path, poolkit=5)
    finally:
        m.close_all()


def test_bad_pool_options_fail_at_wrap() -> None:
    import sqlite3

    with pytest.raises(ValueError, match="max_size"):
        poolkit.dbapi.wrap(sqlite3, max_size=0)
    with pytest.raises(TypeError, match="not a DB-API module"):
        poolkit.dbapi.wrap(os)


def test_ready_made_modules_are_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, poolkit.dbapi; "
        "assert 'psycopg' not in sys.modules and 'pymysql' not in sys.modules, sorted(sys.modules); "
        "m = poolkit.dbapi.sqlite3; assert m.paramstyle == 'qmark'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError):
        poolkit.dbapi.nosuchdriver  # noqa: B018


def test_sqlalchemy_engine_on_the_drop_in_pools_through_poolkit(tmp_path: Any) -> None:
    import sqlite3

    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    m = poolkit.dbapi.wrap(sqlite3)
    try:
        path = str(tmp_path / "sa.db")
        engine = create_engine(
            f"sqlite:///{path}", module=m, poolclass=NullPool, connect_args={"check_same_thread": False}
        )
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        for i in range(5):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t (id) VALUES (:i)"), {"i": i})
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 5
        (pool,) = m.pools().values()
        s = pool.stats()
        assert s.created == 1  # SQLAlchemy opened 7 "connections"; poolkit made one
        assert s.acquired >= 7
        engine.dispose()
    finally:
        m.close_all()


def test_sqlalchemy_engine_on_the_drop_in_postgresql(pg: Any) -> None:
    import psycopg
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    m = poolkit.dbapi.wrap(psycopg)
    try:
        # use_native_hstore=False: psycopg's TypeInfo.fetch() insists on its own Connection class
        engine = create_engine(
            "postgresql+psycopg://",
            module=m,
            poolclass=NullPool,
            creator=lambda: m.connect(PG_DSN),
            use_native_hstore=False,
        )
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 41 + 1")).scalar() == 42
        (pool,) = m.pools().values()
        assert pool.stats().created == 1
        engine.dispose()
    finally:
        m.close_all()


def test_server_killed_connection_behind_the_drop_in(net_backend: Any) -> None:
    if net_backend.name == "postgresql":
        import psycopg as driver

        connect = functools.partial(driver.connect, PG_DSN)
        m = poolkit.dbapi.wrap(driver)
        open_ = functools.partial(m.connect, PG_DSN)
    else:
        import pymysql as driver

        m = poolkit.dbapi.wrap(driver)
        open_ = functools.partial(m.connect, **MYSQL_ARGS)
        connect = None
    del connect
    try:
        c = open_()
        victim = c.pooled.driver_connection
        c.close()
        net_backend.kill(victim)
        c = open_()  # the caller sees no error
        cur = c.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone()[0] == 1
        assert c.pooled.driver_connection is not victim
        c.close()
        (pool,) = m.pools().values()
        assert pool.stats().closed_bad == 1
    finally:
        m.close_all()


def test_a_connect_gets_a_session_with_nothing_of_the_last_callers(net_backend: Any) -> None:
    # The driver's connect() gives a new session; the drop-in's gives a
    # pooled one, reset first (by default): without the reset the next caller
    # got the last one's search_path or session variable, its temporary
    # table, and the lock it took and meant to free by closing.
    if net_backend.name == "postgresql":
        import psycopg as driver

        args: tuple[Any, ...] = (PG_DSN,)
        kwargs: dict[str, Any] = {}
        leave = [
            "SET search_path TO pg_catalog",
            "CREATE TEMPORARY TABLE left_behind (x INT)",
            "SELECT pg_advisory_lock(4242)",
        ]
        look = "SELECT current_setting('search_path') <> 'pg_catalog'"
        lock_free = "SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
    else:
        import pymysql as driver

        args, kwargs = (), dict(MYSQL_ARGS)
        leave = ["SET @left_behind = 1", "CREATE TEMPORARY TABLE left_behind (x INT)", "SELECT GET_LOCK('pk4242', 0)"]
        look = "SELECT @left_behind IS NULL"
        lock_free = "SELECT IS_FREE_LOCK('pk4242') = 1"
    m = poolkit.dbapi.wrap(driver, max_size=1)
    try:
        for options, clean in (({}, True), ({"reset_session": False}, False)):
            c = m.connect(*args, poolkit=options or None, **kwargs) if options else m.connect(*args, **kwargs)
            first = net_backend.server_id(c.pooled.driver_connection)
            cur = c.cursor()
            for sql in leave:
                cur.execute(sql)
            c.commit()
            assert not net_backend.execute(lock_free)[0][0]
            c.close()
            # freed by close(), as the driver's own close frees it: not when
            # the connection is next handed out (up to max_idle_time later)
            assert bool(net_backend.execute(lock_free)[0][0]) is clean
            c = m.connect(*args, poolkit=options or None, **kwargs) if options else m.connect(*args, **kwargs)
            assert net_backend.server_id(c.pooled.driver_connection) == first  # the same session, reused
            cur = c.cursor()
            cur.execute(look)
            assert bool(cur.fetchone()[0]) is clean
            try:
                cur.execute("SELECT count(*) FROM left_behind")
                cur.fetchall()
                table_gone = False
            except driver.ProgrammingError:
                table_gone = True
                c.rollback()
            assert table_gone is clean
            assert bool(net_backend.execute(lock_free)[0][0]) is clean
            c.close()
            m.close_all()  # the next round's pool: a new one, with its options
    finally:
        m.close_all()


def test_a_reset_session_keeps_what_the_callers_connect_arguments_set(maria: Any) -> None:
    # COM_RESET_CONNECTION puts every session variable back to the server's
    # default, and with them what PyMySQL's connect() set after the
    # handshake: the next connect() of the drop-in (which resets by default)
    # compared as utf8mb4_general_ci where the caller asked for
    # utf8mb4_unicode_ci ('ß' = 'ss' no longer held), and lost its sql_mode
    # and init_command (a strict mode lost lets an INSERT truncate).
    import pymysql

    kwargs = {
        **MYSQL_ARGS,
        "collation": "utf8mb4_unicode_ci",
        "sql_mode": "TRADITIONAL",
        "init_command": "SET SESSION time_zone = '+03:00'",
    }
    m = poolkit.dbapi.wrap(pymysql, max_size=1)
    try:
        seen = []
        for _ in range(3):
            c = m.connect(**kwargs)
            seen.append(c.pooled.driver_connection)
            cur = c.cursor()
            cur.execute("SELECT @@collation_connection, @@sql_mode, @@time_zone, 'ß' = 'ss'")
            collation, sql_mode, time_zone, equal = cur.fetchone()
            assert collation == "utf8mb4_unicode_ci" and equal == 1
            assert "STRICT_ALL_TABLES" in sql_mode and time_zone == "+03:00"
            # this caller's own changes: undone for the next
            cur.execute("SET NAMES latin1")
            cur.execute("SET sql_mode = '', time_zone = '+05:00'")
            c.close()
        assert all(d is seen[0] for d in seen)  # one connection, reset each time
    finally:
        m.close_all()


def test_sqlite3_drop_in_keeps_a_trace_callback_from_the_next_caller(tmp_path: Any) -> None:
    # The drop-in read the connection's other attributes from the driver's
    # connection, past what the proxy guards: a trace callback a caller set
    # (sqlite3 has no getter to save it) saw the next callers' statements,
    # with their values.
    m = poolkit.dbapi.wrap("sqlite3", max_size=1)
    seen: list[str] = []
    try:
        c = m.connect(str(tmp_path / "trace.db"))
        c.set_trace_callback(seen.append)
        c.execute("SELECT 'mine'")
        c.close()
        c = m.connect(str(tmp_path / "trace.db"))
        c.execute("SELECT 'the next caller''s secret'")
        c.close()
    finally:
        m.close_all()
    assert seen == ["SELECT 'mine'"]


def test_pymysql_drop_in_never_reconnects_behind_the_pool(maria: Any) -> None:
    # Read from the driver's connection, ping(reconnect=True) and connect()
    # opened a new session behind the pool's back (the transaction went on
    # in it, half lost); through the proxy, the ping raises on a dead
    # connection and connect() is not there.
    m = poolkit.dbapi.wrap("pymysql", max_size=1)
    try:
        c = m.connect(**MYSQL_ARGS)
        assert not hasattr(c, "connect")
        session = maria.server_id(c.pooled.driver_connection)
        maria.kill(c.pooled.driver_connection)
        with pytest.raises(m.OperationalError):
            c.ping(reconnect=True)
        c.close()
        c = m.connect(**MYSQL_ARGS)
        assert maria.server_id(c.pooled.driver_connection) != session  # a new one, opened by the pool
        c.close()
        (pool,) = m.pools().values()
        assert pool.stats().closed_bad == 1
    finally:
        m.close_all()
