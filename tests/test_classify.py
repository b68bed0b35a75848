"""The classifier: categories, the chain walk, the registry."""

from __future__ import annotations

import errno
import sqlite3
import sys
from typing import Any

import fakedb
import pytest

from poolkit import AmbiguousCommitError, Category, Classification, PoolTimeout, classify
from poolkit.drivers import Driver, register_driver


def _chain(inner: BaseException, depth: int, via: str) -> BaseException:
    """``inner`` wrapped ``depth`` levels deep in generic RuntimeErrors."""
    exc = inner
    for i in range(depth):
        outer = RuntimeError(f"level {i}")
        if via == "cause":
            outer.__cause__ = exc
        else:
            outer.__context__ = exc
        exc = outer
    return exc


@pytest.mark.parametrize("inner", [EOFError("eof"), ConnectionResetError("reset"), BrokenPipeError("pipe")])
@pytest.mark.parametrize("depth", range(1, 11))
@pytest.mark.parametrize("via", ["cause", "context"])
def test_network_errors_anywhere_in_the_chain_are_bad_connection(inner: BaseException, depth: int, via: str) -> None:
    c = classify(_chain(inner, depth, via))
    assert c.category is Category.BAD_CONNECTION
    assert c.source is inner
    assert c.reason == ("eof" if isinstance(inner, EOFError) else "network")


def test_chain_with_a_cycle_terminates() -> None:
    a = RuntimeError("a")
    b = ValueError("b")
    eof = EOFError()
    a.__context__ = b
    b.__cause__ = a  # a cycle
    b.__context__ = eof
    assert classify(a).category is Category.BAD_CONNECTION
    c = RuntimeError("c")
    c.__cause__ = c
    assert classify(c).category is Category.PERMANENT


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are new in Python 3.11")
def test_exception_groups_are_walked() -> None:
    group = ExceptionGroup("many", [ValueError("x"), ExceptionGroup("inner", [ConnectionResetError()])])  # noqa: F821
    assert classify(group).category is Category.BAD_CONNECTION


def test_most_cautious_finding_wins() -> None:
    outer = fakedb.OperationalError("retry me", code=40001)  # RETRYABLE
    outer.__context__ = EOFError()  # BAD_CONNECTION
    assert classify(outer).category is Category.BAD_CONNECTION
    amb = AmbiguousCommitError("x")
    amb.__cause__ = outer
    assert classify(amb).category is Category.AMBIGUOUS


def test_unknown_errors_are_permanent() -> None:
    assert classify(ValueError("what")).category is Category.PERMANENT
    assert classify(KeyError("k")).reason == "unknown"


def test_pool_errors_say_nothing_about_connections() -> None:
    assert classify(PoolTimeout("no connection")).category is Category.PERMANENT


def test_os_errors_by_errno() -> None:
    assert classify(OSError(errno.ECONNRESET, "reset")).category is Category.BAD_CONNECTION
    assert classify(TimeoutError("timed out")).category is Category.BAD_CONNECTION
    assert classify(OSError(errno.ENOENT, "no file")).category is Category.PERMANENT


def test_commit_failure_on_a_dead_connection_is_ambiguous() -> None:
    c = classify(ConnectionResetError(), during_commit=True)
    assert c.category is Category.AMBIGUOUS and c.reason == "network"
    # a conflict at commit is still just a conflict
    assert classify(fakedb.OperationalError("x", code=40001), during_commit=True).category is Category.RETRYABLE


def test_broken_connection_makes_an_unknown_error_bad() -> None:
    class Conn:
        closed = True

    assert classify(ValueError("odd"), connection=Conn()).category is Category.BAD_CONNECTION


def test_sqlite_busy_and_closed() -> None:
    a = sqlite3.connect(":memory:")
    a.close()
    with pytest.raises(sqlite3.ProgrammingError) as info:
        a.execute("SELECT 1")
    assert classify(info.value).category is Category.BAD_CONNECTION


def test_psycopg_client_side_errors_are_bad_connection() -> None:
    import psycopg

    for msg in ("connection socket closed", "consuming input failed: EOF", "server closed the connection"):
        assert classify(psycopg.OperationalError(msg)).category is Category.BAD_CONNECTION, msg
    assert classify(psycopg.InterfaceError("the connection is closed")).category is Category.BAD_CONNECTION
    assert classify(psycopg.errors.SerializationFailure("x")).category is Category.RETRYABLE


def test_generic_driver_messages() -> None:
    class OperationalError(Exception):
        pass

    OperationalError.__module__ = "somedriver"
    assert classify(OperationalError("SSL connection has been closed unexpectedly: lost connection")).category is (
        Category.BAD_CONNECTION
    )
    assert classify(OperationalError("database is locked")).category is Category.RETRYABLE
    assert classify(OperationalError("syntax error")).category is Category.PERMANENT


def test_registry_lets_users_add_a_driver_and_override_a_rule() -> None:
    class MyError(Exception):
        pass

    MyError.__module__ = "mydriver.errors"

    class MyDriver(Driver):
        name = "mydriver"

        def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
            if "leader" in str(exc):
                return ("NOT_LEADER", "not_leader")
            return None

    assert classify(MyError("not the leader")).category is Category.PERMANENT
    register_driver("mydriver", MyDriver())
    assert classify(MyError("not the leader")).category is Category.NOT_LEADER
    with pytest.raises(TypeError):
        register_driver("x", object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        register_driver("a.b", MyDriver())


def test_pool_custom_classifier_comes_first(server: fakedb.Server) -> None:
    from poolkit import Pool

    def mine(exc: BaseException) -> Classification | None:
        if isinstance(exc, KeyError):
            return Classification(Category.RETRYABLE, "custom")
        return None

    pool = Pool(server.connect, classifier=mine)
    try:
        assert pool.classify(KeyError()).reason == "custom"
        assert pool.classify(EOFError()).category is Category.BAD_CONNECTION  # falls back
    finally:
        pool.close()


def test_classifying_a_known_kind_of_error_again_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # classify() runs on every error a proxy sees: once a driver's module is
    # known, no import statement runs (a cached import still costs a lookup
    # and the import lock). What classification costs is the benchmark
    # runner's to show, not a timed test's.
    import builtins

    import psycopg
    import pymysql

    samples: list[Any] = [
        _chain(EOFError(), 3, "cause"),
        pymysql.err.OperationalError(2013, "Lost connection"),
        psycopg.errors.SerializationFailure("could not serialize"),
        ValueError("x"),
        sqlite3.OperationalError("database is locked"),
    ]
    first = [classify(s) for s in samples]  # may import the drivers' modules
    imported: list[str] = []
    real_import = builtins.__import__

    def counting_import(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting_import)
    again = [classify(s) for s in samples]
    monkeypatch.undo()
    assert imported == []
    assert [c.category for c in again] == [c.category for c in first]
    assert [c.category for c in again] == [
        Category.BAD_CONNECTION,
        Category.BAD_CONNECTION,
        Category.RETRYABLE,
        Category.PERMANENT,
        Category.RETRYABLE,
    ]


def test_a_chain_of_any_length_is_walked_no_further_than_max_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules["poolkit.classify"]  # the package's name `classify` is the function
    looked_at: list[BaseException] = []
    real = module._classify_one
    monkeypatch.setattr(module, "_classify_one", lambda e: looked_at.append(e) or real(e))
    deep = _chain(EOFError(), 10_000, "cause")
    c = classify(deep)
    assert len(looked_at) == module.MAX_CHAIN
    assert c.category is Category.PERMANENT  # the EOF lies beyond what is looked at
    looked_at.clear()
    assert classify(_chain(EOFError(), module.MAX_CHAIN - 1, "context")).category is Category.BAD_CONNECTION
    assert len(looked_at) == module.MAX_CHAIN
