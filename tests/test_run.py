"""pool.run and pool.transaction on the fake driver: what is retried, what is not."""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from typing import Any

import fakedb
import pytest

from poolkit import AmbiguousCommitError, Pool, PoolTimeout, Retry

FAST = Retry(attempts=5, deadline=5, initial_backoff=0.001, max_backoff=0.005)


def insert(conn: Any, sql: str = "INSERT x") -> str:
    conn.cursor().execute(sql)
    return "done"


class Script:
    """Raises the given errors on successive calls, then succeeds."""

    def __init__(self, *errors: BaseException | None) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.conns: list[Any] = []

    def __call__(self, conn: Any) -> str:
        self.calls += 1
        self.conns.append(conn.driver_connection)
        conn.cursor().execute("INSERT x")
        if self.errors:
            err = self.errors.pop(0)
            if err is not None:
                if getattr(err, "_kill", False):
                    conn.driver_connection.kill()
                raise err
        return "ok"


def dead(msg: str = "lost connection") -> fakedb.OperationalError:
    err = fakedb.OperationalError(msg, code=2013)
    err._kill = True  # type: ignore[attr-defined]
    return err


def test_success_commits_and_returns_the_result(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    assert pool.run(insert) == "done"
    assert server.committed == ["INSERT x"]
    assert pool.stats().retries == 0


def test_error_rolls_back_and_raises(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)

    def bad(conn: Any) -> None:
        conn.cursor().execute("INSERT x")
        raise ValueError("app bug")

    with pytest.raises(ValueError, match="app bug"):
        pool.run(bad)
    assert server.committed == []
    assert pool.stats().in_use == 0


def test_retryable_runs_the_whole_function_again(make_pool: Any, server: fakedb.Server, caplog: Any) -> None:
    pool = make_pool(retry=FAST, name="r")
    fn = Script(fakedb.OperationalError("could not serialize", code=40001), None)
    with caplog.at_level(logging.WARNING, logger="poolkit.retry"):
        assert pool.run(fn) == "ok"
    assert fn.calls == 2
    assert server.committed == ["INSERT x"]  # once: the first attempt was rolled back
    assert pool.stats().retries == 1
    assert "RETRYABLE" in caplog.text and "serialization" in caplog.text and "'r'" in caplog.text
    assert fn.conns[0] is fn.conns[1]  # a conflict doesn't cost the connection


def test_not_leader_invalidates_the_pool_and_is_retried(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST, max_size=3)
    others = [pool.acquire() for _ in range(2)]
    for c in others:
        c.close()
    fn = Script(fakedb.OperationalError("cannot execute INSERT in a read-only transaction", code=25006), None)
    assert pool.run(fn) == "ok"
    assert fn.calls == 2
    assert fn.conns[0] is not fn.conns[1]
    assert all(c.closed for c in fn.conns[:1])
    s = pool.stats()
    assert s.generation == 1 and s.closed_invalidated >= 1
    assert server.committed == ["INSERT x"]


def test_bad_connection_after_the_work_was_sent_is_not_retried(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    fn = Script(dead(), None)
    with pytest.raises(fakedb.OperationalError, match="lost connection"):
        pool.run(fn)
    assert fn.calls == 1  # attempted at most once
    assert pool.stats().closed_bad == 1


def test_bad_connection_is_retried_when_idempotent(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    fn = Script(dead(), None)
    assert pool.run(fn, idempotent=True) == "ok"
    assert fn.calls == 2
    assert fn.conns[0].closed and fn.conns[0] is not fn.conns[1]


BACKOFF = Retry(attempts=5, deadline=5, initial_backoff=0.02, max_backoff=0.02)


def test_the_first_lost_connection_is_retried_at_once_the_next_one_after_a_wait(
    make_pool: Any, server: fakedb.Server, caplog: Any, retry_waits: Any
) -> None:
    pool = make_pool(retry=BACKOFF)
    fn = Script(dead(), dead(), None)
    with caplog.at_level(logging.WARNING, logger="poolkit.retry"):
        assert pool.run(fn, idempotent=True) == "ok"
    assert fn.calls == 3
    assert retry_waits("poolkit.retry") == [0.0, 0.02]
    assert pool.stats().retries == 2


def test_a_conflict_or_a_write_rejected_as_not_leader_is_retried_after_a_wait(
    make_pool: Any, server: fakedb.Server, caplog: Any, retry_waits: Any
) -> None:
    # these say something about the server (busy with others; electing a
    # leader), so the first retry waits already. (A connection that cannot be
    # opened never reaches run: acquire() retries the connect, backing off.)
    pool = make_pool(retry=BACKOFF)
    fn = Script(
        fakedb.OperationalError("cannot execute INSERT in a read-only transaction", code=25006),
        fakedb.OperationalError("could not serialize", code=40001),
        None,
    )
    with caplog.at_level(logging.WARNING, logger="poolkit.retry"):
        assert pool.run(fn) == "ok"
    assert fn.calls == 3
    assert retry_waits("poolkit.retry") == [0.02, 0.02]


def test_connection_lost_at_commit_is_ambiguous_and_not_retried(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    server.commit_error = ConnectionResetError("reset during COMMIT")
    fn = Script()
    with pytest.raises(AmbiguousCommitError, match="unknown") as info:
        pool.run(fn)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert fn.calls == 1
    assert pool.stats().closed_bad == 1


def test_ambiguous_commit_is_retried_when_idempotent(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    server.commit_error = ConnectionResetError("reset during COMMIT")
    fn = Script()
    assert pool.run(fn, idempotent=True) == "ok"
    assert fn.calls == 2


def test_permanent_is_never_retried(make_pool: Any) -> None:
    pool = make_pool(retry=FAST)
    fn = Script(fakedb.IntegrityError("duplicate key"), None)
    with pytest.raises(fakedb.IntegrityError):
        pool.run(fn, idempotent=True)
    assert fn.calls == 1


def test_retries_run_out_and_the_last_driver_error_is_raised_unchanged(make_pool: Any) -> None:
    pool = make_pool(retry=Retry(attempts=3, deadline=5, initial_backoff=0.001, max_backoff=0.001))
    errors = [fakedb.OperationalError(f"conflict {i}", code=40001) for i in range(5)]
    fn = Script(*errors)
    with pytest.raises(fakedb.OperationalError) as info:
        pool.run(fn)
    assert info.value is errors[2]
    assert fn.calls == 3
    assert pool.stats().retries == 2


def test_deadline_bounds_the_retries(make_pool: Any) -> None:
    import time

    pool = make_pool(retry=Retry(attempts=1000, deadline=0.3, initial_backoff=0.05, max_backoff=0.05))
    fn = Script(*[fakedb.OperationalError("conflict", code=40001)] * 1000)
    t0 = time.monotonic()
    with pytest.raises(fakedb.OperationalError):
        pool.run(fn)
    assert time.monotonic() - t0 < 0.3 + 0.2
    assert 2 <= fn.calls < 50


def test_last_attempt_uses_a_freshly_opened_connection(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=Retry(attempts=3, deadline=5, initial_backoff=0.001, max_backoff=0.001), max_size=1)
    fn = Script(fakedb.OperationalError("c", code=40001), fakedb.OperationalError("c", code=40001), None)
    assert pool.run(fn) == "ok"
    assert fn.conns[0] is fn.conns[1]  # a conflict keeps the connection...
    assert fn.conns[2] is not fn.conns[1]  # ...but the last attempt trusts no pooled one
    assert fn.conns[1].closed
    assert pool.stats().open == 1


@pytest.mark.parametrize("how", ["call", "pool", "env"])
def test_retries_can_be_turned_off(make_pool: Any, monkeypatch: Any, how: str) -> None:
    if how == "env":
        monkeypatch.setenv("POOLKIT_RETRY", "off")
    pool = make_pool(retry=False if how == "pool" else FAST)
    fn = Script(fakedb.OperationalError("c", code=40001), None)
    with pytest.raises(fakedb.OperationalError):
        pool.run(fn, retry=False if how == "call" else None)
    assert fn.calls == 1


def test_pool_timeout_is_not_retried(make_pool: Any) -> None:
    pool = make_pool(retry=FAST, max_size=1)
    held = pool.acquire()
    calls = []
    with pytest.raises(PoolTimeout):
        pool.run(lambda c: calls.append(1), timeout=0.05)
    assert not calls
    held.close()


def test_run_sends_nothing_before_the_function(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    seen: list[Any] = []

    def fn(conn: Any) -> None:
        seen.append(list(conn.driver_connection.pending))
        conn.cursor().execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")

    pool.run(fn)
    assert seen == [[]]


def test_run_opens_a_transaction_on_an_autocommit_connection(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST, configure=lambda raw: setattr(raw, "autocommit", True))

    def fn(conn: Any) -> None:
        conn.cursor().execute("INSERT a")
        raise ValueError("undo")

    with pytest.raises(ValueError):
        pool.run(fn)
    # the generic begin() sent BEGIN, so the INSERT was not autocommitted... on the fake,
    # BEGIN is just another statement; what matters is that it was sent first
    assert server.committed[:1] == ["BEGIN"]


def test_transaction_commits_or_rolls_back(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool()
    with pool.transaction() as conn:
        conn.cursor().execute("INSERT ok")
    assert server.committed == ["INSERT ok"]
    with pytest.raises(ValueError):
        with pool.transaction() as conn:
            conn.cursor().execute("INSERT no")
            raise ValueError
    assert server.committed == ["INSERT ok"]


def test_transaction_commit_lost_is_ambiguous(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool()
    server.commit_error = BrokenPipeError("pipe")
    with pytest.raises(AmbiguousCommitError):
        with pool.transaction() as conn:
            conn.cursor().execute("INSERT x")
    assert pool.stats().closed_bad == 1


def test_request_id_makes_a_retry_after_an_ambiguous_commit_safe(make_pool: Any, server: fakedb.Server) -> None:
    """The fake can't store a ledger; the real-server tests check the rows.
    Here: an AMBIGUOUS outcome with a request id is retried, not raised."""
    pool = make_pool(retry=FAST)
    ledger_sql: list[str] = []

    class FakeLedger:
        rows: set[str] = set()

        def ensure(self, conn: Any) -> None:
            pass

        def record(self, conn: Any, rid: str) -> None:
            ledger_sql.append("record")
            if rid in self.rows:
                raise fakedb.IntegrityError("duplicate request id")

    pool.ledger = FakeLedger()
    server.commit_error = ConnectionResetError("reset during COMMIT")
    fn = Script()
    assert pool.run(fn, request_id="r1") == "ok"
    assert fn.calls == 2
    assert ledger_sql == ["record", "record"]  # the id goes in before the work, on each attempt
    # and when the id is there already: not run again
    FakeLedger.rows.add("r2")
    fn2 = Script()
    assert pool.run(fn2, request_id="r2") is None
    assert fn2.calls == 0


def test_bad_request_ids_are_refused(make_pool: Any) -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="request_id"):
        pool.run(insert, request_id="")
    with pytest.raises(ValueError, match="request_id"):
        pool.run(insert, request_id="x" * 201)
    with pytest.raises(TypeError, match="fn must be a callable"):
        pool.run("INSERT")  # type: ignore[arg-type]


def test_isolation_levels_are_spelled_as_sql_does_and_others_refused(make_pool: Any) -> None:
    import psycopg

    from poolkit import Category
    from poolkit.retry import isolation

    assert isolation("serializable") == "SERIALIZABLE"
    assert isolation(" repeatable_read ") == "REPEATABLE READ"
    assert isolation("READ-COMMITTED") == "READ COMMITTED"  # as MySQL shows it
    assert isolation(psycopg.IsolationLevel.REPEATABLE_READ) == "REPEATABLE READ"  # an enum, by name
    assert isolation(None) is None
    pool = make_pool()
    fn = Script()
    for bad in ("snapshot", "SERIALIZABLE; DROP TABLE t", 3, Category.PERMANENT):
        with pytest.raises(ValueError, match="isolation_level must be one of READ UNCOMMITTED"):
            pool.run(fn, isolation_level=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="isolation_level"):
            pool.transaction(isolation_level=bad)  # type: ignore[arg-type]
    assert fn.calls == 0 and pool.stats().acquired == 0  # refused before a checkout


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        Retry(deadline=-1)
    for name in ("deadline", "initial_backoff", "max_backoff"):
        with pytest.raises(ValueError, match=f"{name} must be a number >= 0, got nan"):
            Retry(**{name: float("nan")})
    for name in ("initial_backoff", "max_backoff"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            Retry(**{name: float("inf")})
    assert Retry(deadline=float("inf")).deadline == float("inf")  # no deadline: attempts bound it
    assert not Retry.off().enabled and Retry.default().enabled


def test_bad_connection_mid_work_is_retried_with_a_request_id(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(retry=FAST)
    seen: list[str] = []

    class FakeLedger:
        def ensure(self, conn: Any) -> None:
            seen.append("ensure")

        def record(self, conn: Any, rid: str) -> None:
            seen.append("record")

    pool.ledger = FakeLedger()
    fn = Script(dead(), None)
    assert pool.run(fn, request_id="r3") == "ok"
    assert fn.calls == 2
    assert seen == ["ensure", "record", "ensure", "record"]  # the id went in again before the second attempt


def test_a_ledger_insert_waits_until_the_deadline_and_at_least_a_second() -> None:
    """How long a ledger insert may wait for a transaction holding its id
    (the real-server tests check that the pool cuts it there)."""
    import time

    from poolkit.retry import MIN_LEDGER_WAIT, ledger_wait

    now = time.monotonic()
    assert 9.0 < ledger_wait(Retry(deadline=10), now) <= 10.0  # type: ignore[operator]
    assert ledger_wait(Retry(deadline=10), now - 9.5) == MIN_LEDGER_WAIT  # near the deadline: still a second
    assert ledger_wait(Retry(deadline=float("inf")), now) is None  # no deadline: no bound


def test_a_custom_driver_whose_begin_takes_no_level_is_named_when_a_level_is_asked_for(
    server: fakedb.Server,
) -> None:
    class OldDriver(fakedb.FakeDriver):
        def begin(self, conn: Any) -> None:  # written before begin() took an isolation level
            super().begin(conn)

    pool = Pool(server.connect, driver=OldDriver(), retry=False)
    try:
        assert pool.run(lambda conn: "ok") == "ok"  # without a level: as ever
        with pytest.raises(TypeError, match="cannot set an isolation level: its begin"):
            pool.run(lambda conn: "ok", isolation_level="SERIALIZABLE")
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("kw", "exc", "text"),
    [
        ({"idempotent": "no"}, TypeError, "idempotent must be True or False, not str 'no'"),
        ({"idempotent": 1}, TypeError, "idempotent must be True or False, not int 1"),
        ({"request_id": 123}, TypeError, "request_id must be a str or None, not int"),
        ({"request_id": ""}, ValueError, "request_id must be a non-empty str of at most 200 characters, got 0"),
        ({"request_id": "x" * 201}, ValueError, "at most 200 characters, got 201"),
    ],
)
def test_bad_call_options_are_refused_before_any_checkout(
    make_pool: Any, server: fakedb.Server, kw: dict[str, Any], exc: type, text: str
) -> None:
    # idempotent="no" (a string from a configuration) was truthy: work that
    # must not run twice would have been retried as if it could.
    pool = make_pool()
    calls = []
    with pytest.raises(exc, match=re.escape(text)):
        pool.run(lambda conn: calls.append(1), **kw)
    assert calls == [] and pool.stats().acquired == 0


@pytest.mark.parametrize("inner", ["run", "transaction", "acquire"])
def test_a_checkout_nested_in_a_run_that_holds_every_connection_fails_at_once(make_pool: Any, inner: str) -> None:
    # With every connection held by this thread's own run (or transaction),
    # none could come back while the nested checkout waited: it waited the
    # whole timeout (30 s by default), then said only that it timed out.
    pool = make_pool(max_size=2, timeout=30)

    def nested(conn: Any) -> None:
        if inner == "run":
            pool.run(lambda c: None)
        elif inner == "transaction":
            with pool.transaction():
                pass
        else:
            pool.acquire().close()

    def two_deep(conn: Any) -> None:
        with pool.transaction():  # the second connection: both are this thread's now
            nested(conn)

    t0 = time.monotonic()
    with pytest.raises(PoolTimeout, match=r"holds every one of its connections \(max_size=2\)"):
        pool.run(two_deep)
    assert time.monotonic() - t0 < 5
    pool.run(lambda conn: pool.run(lambda c: None))  # one held, one free: no deadlock, no error
    assert pool.stats().in_use == 0


def test_a_checkout_nested_in_a_run_waits_as_usual_when_another_thread_can_return_one(make_pool: Any) -> None:
    pool = make_pool(max_size=2, timeout=5)
    other = pool.acquire()  # held by another caller, not by this thread's run
    gave_back = threading.Timer(0.2, other.close)
    gave_back.start()
    try:
        assert pool.run(lambda conn: pool.run(lambda c: "served")) == "served"
    finally:
        gave_back.cancel()


def test_a_context_copied_into_another_thread_does_not_count_as_holding(make_pool: Any) -> None:
    # asyncio.to_thread (and anything that copies the context into a thread)
    # carries the outer run's entry along: that thread holds nothing, and its
    # checkout must wait as usual, not fail as one waiting for itself.
    pool = make_pool(max_size=1, timeout=5)
    copied: list[contextvars.Context] = []
    pool.run(lambda conn: copied.append(contextvars.copy_context()))  # taken inside the work
    other = pool.acquire()  # the one connection, busy elsewhere for a moment
    threading.Timer(0.2, other.close).start()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(copied[0].run(pool.run, lambda conn: "served")))
    t.start()
    t.join(5)
    assert got == ["served"]


def _in_thread(ctx: contextvars.Context, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a new thread, in ``ctx``: what anyio's
    ``to_thread.run_sync`` does (with a fresh copy of the context each call)."""
    out: list[Any] = []

    def call() -> None:
        try:
            out.append(ctx.run(fn, *args))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join(5)
    return out[0]


def test_a_transaction_that_ends_in_another_context_commits(tmp_path: Any) -> None:
    # FastAPI runs a dependency with yield (`with pool.transaction() as conn:
    # yield conn`) in worker threads: its enter in one copy of the context,
    # its exit in another. The exit could not reset the context variable
    # there: it raised ValueError ("created in a different Context"), and
    # the transaction was rolled back.
    import sqlite3

    path = str(tmp_path / "deps.db")
    sqlite3.connect(path).execute("CREATE TABLE t (v)").connection.close()
    pool = Pool(lambda: sqlite3.connect(path, check_same_thread=False), max_size=2)

    def get_db() -> Any:
        with pool.transaction() as conn:
            yield conn

    try:
        dep = get_db()
        conn = _in_thread(contextvars.copy_context(), next, dep)
        conn.execute("INSERT INTO t VALUES (1)")
        ended = _in_thread(contextvars.copy_context(), next, dep)
        assert isinstance(ended, StopIteration), ended
        assert pool.stats().in_use == 0
    finally:
        pool.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_transaction_ended_in_another_context_no_longer_counts_as_held(make_pool: Any) -> None:
    # Begun in this context and ended in another, the block's entry stays in
    # this context's variable (the other cannot reset it): counted, it made
    # a later checkout here that must wait fail at once, as one waiting for
    # a connection its own thread held.
    pool = make_pool(max_size=1, timeout=5)

    def block() -> Any:
        with pool.transaction() as conn:
            yield conn

    dep = block()
    next(dep)  # begun here
    assert isinstance(_in_thread(contextvars.copy_context(), next, dep), StopIteration)  # ended elsewhere
    other = pool.acquire()  # the one connection, busy elsewhere for a moment
    threading.Timer(0.2, other.close).start()
    with pool.connection() as conn:  # waits for it
        assert not conn.closed
