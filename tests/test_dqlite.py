"""dqlite: a real 3-node cluster, real signals, real leader elections.

Runs in the Python 3.13 tox environment (dqlite-dbapi needs it); the
cluster is made of ``dqlite-demo`` processes (Debian package go-dqlite).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

import poolkit
from poolkit import AmbiguousCommitError, Category, Pool, PoolTimeout, Retry, classify

pytestmark = [pytest.mark.integration, pytest.mark.dqlite]

if sys.version_info < (3, 13):
    pytest.skip("dqlite-dbapi needs Python >= 3.13: the py313 tox environment runs these", allow_module_level=True)

from conftest import need_server  # noqa: E402

from poolkit.testing.dqlite import DqliteCluster, DqliteUnavailable  # noqa: E402

BUDGET = Retry(attempts=40, deadline=30, initial_backoff=0.05, max_backoff=1.0)


@pytest.fixture
def cluster() -> Any:
    try:
        c = DqliteCluster(3)
    except DqliteUnavailable as exc:
        need_server("dqlite (go-dqlite)", exc)
    with c:
        yield c


def make_pool(cluster: DqliteCluster, rpc_timeout: float = 2.0, **kw: Any) -> Pool:
    kw.setdefault("max_size", 4)
    kw.setdefault("timeout", 20)
    kw.setdefault("retry", BUDGET)
    kw.setdefault("ping_after", 1.0)
    return Pool(poolkit.failover(*cluster.connects(timeout=rpc_timeout)), **kw)


def create_table(pool: Pool, name: str = "t") -> None:
    pool.run(lambda c: c.cursor().execute(f"CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY, v TEXT)"))


def rows(pool: Pool, name: str = "t") -> list[int]:
    def read(c: Any) -> list[int]:
        cur = c.cursor()
        cur.execute(f"SELECT id FROM {name} ORDER BY id")
        return [r[0] for r in cur.fetchall()]

    return pool.run(read, idempotent=True)


def test_cluster_helper_starts_elects_and_cleans_up() -> None:
    try:
        c = DqliteCluster(3)
    except DqliteUnavailable as exc:
        need_server("dqlite (go-dqlite)", exc)
    with c:
        assert c.leader() is not None
        assert set(c.roles().values()) == {"voter"} and len(c.roles()) == 3
        procs = [n.proc for n in c.nodes]
    assert all(p is not None and p.poll() is not None for p in procs)  # no process left behind
    import os

    assert not os.path.exists(c.directory)


def test_classifier_and_check_same_thread(cluster: DqliteCluster) -> None:
    import dqlitedbapi

    confined = Pool(lambda: dqlitedbapi.connect(cluster.addresses[0], database="poolkit"), retry=False)
    try:
        with pytest.raises(ValueError, match="check_same_thread=False"):
            confined.acquire(timeout=5)
    finally:
        confined.close()
    assert classify(dqlitedbapi.OperationalError("x", code=10250)).category is Category.NOT_LEADER
    assert classify(dqlitedbapi.OperationalError("disk I/O error", code=10506)).category is Category.AMBIGUOUS
    assert classify(dqlitedbapi.AmbiguousCommitError("x")).category is Category.AMBIGUOUS
    assert classify(dqlitedbapi.OperationalError("database is locked", code=5)).category is Category.RETRYABLE
    assert classify(dqlitedbapi.OperationalError("Connection closed by server")).category is Category.BAD_CONNECTION
    assert classify(dqlitedbapi.InterfaceError("wire session was lost")).category is Category.BAD_CONNECTION


def test_the_drop_in_needs_no_check_same_thread(cluster: DqliteCluster) -> None:
    # dqlitedbapi.connect's default check_same_thread=True is refused by a
    # pool (above); the drop-in opens its connections with False unless told.
    import threading

    import dqlitedbapi

    import poolkit.dbapi

    m = poolkit.dbapi.wrap(dqlitedbapi, timeout=20)
    leader = cluster.leader()
    assert leader is not None
    try:
        c = m.connect(leader.address, database="poolkit")
        c.cursor().execute("CREATE TABLE IF NOT EXISTS dropin (id INTEGER PRIMARY KEY)")
        c.commit()
        c.close()
        seen: list[Any] = []

        def elsewhere() -> None:
            c = m.connect(leader.address, database="poolkit")
            cur = c.cursor()
            cur.execute("SELECT count(*) FROM dropin")
            seen.append(cur.fetchone())
            c.close()

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert seen == [(0,)]
        with pytest.raises(ValueError, match="check_same_thread=False"):
            m.connect(leader.address, database="poolkit", check_same_thread=True)
    finally:
        m.close_all()


def test_failover_skips_dead_seeds(cluster: DqliteCluster) -> None:
    cluster.kill(cluster.nodes[0])
    cluster.wait_for_leader()
    connect = poolkit.failover(*cluster.connects())
    conn = connect()  # the first seed is dead: the second answers
    conn.close()
    cluster.kill(cluster.nodes[1])
    cluster.kill(cluster.nodes[2])
    with pytest.raises(Exception):
        poolkit.failover(*cluster.connects(timeout=1.0))()


def test_reads_and_writes_ride_out_a_leader_kill(cluster: DqliteCluster) -> None:
    pool = make_pool(cluster)
    try:
        create_table(pool)
        stop = threading.Event()
        read_errors: list[BaseException] = []
        reads = [0]
        acked: list[int] = []
        write_errors: list[BaseException] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    pool.run(lambda c: c.cursor().execute("SELECT count(*) FROM t").fetchall(), idempotent=True)
                    reads[0] += 1
                except BaseException as exc:
                    read_errors.append(exc)

        def writer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    pool.run(
                        lambda c, i=i: c.cursor().execute("INSERT INTO t (id, v) VALUES (?, 'w')", (i,)),
                        request_id=f"w-{i}",
                    )
                    acked.append(i)
                except BaseException as exc:
                    write_errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(acked) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = len(acked)
        cluster.kill(cluster.wait_for_leader())
        cluster.wait_for_leader()
        deadline = time.monotonic() + 30
        while len(acked) < before + 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert not read_errors, read_errors[:3]
        assert not write_errors, write_errors[:3]
        assert len(acked) >= before + 10  # the pool recovered without a restart
        present = rows(pool)
        assert set(acked) <= set(present)  # every acknowledged write is there
        assert len(present) == len(set(present))  # none twice (the primary key would refuse it anyway)
        assert pool.stats().closed_bad + pool.stats().closed_invalidated >= 1
    finally:
        pool.close()


def test_not_leader_after_a_leader_change_invalidates_and_lands_once(cluster: DqliteCluster, caplog: Any) -> None:
    pool = make_pool(cluster, ping_after=3600)  # no ping: the stale connection must meet the write
    try:
        create_table(pool)
        with pool.connection() as conn:
            stale = conn.driver_connection
        old = cluster.wait_for_leader()
        assert stale._async._client._address == old.address
        cluster.pause(old)  # SIGSTOP: the others elect a new leader
        deadline = time.monotonic() + 30
        while (cluster.leader() in (None, old)) and time.monotonic() < deadline:
            time.sleep(0.1)
        new = cluster.leader()
        assert new is not None and new is not old
        cluster.resume(old)  # back, as a follower
        time.sleep(1.0)
        calls = 0

        def write(c: Any) -> None:
            nonlocal calls
            calls += 1
            c.cursor().execute("INSERT INTO t (id, v) VALUES (1, 'once')")

        with caplog.at_level("WARNING", logger="poolkit"):
            pool.run(write)
        # the stale connection met NOT_LEADER (on run's BEGIN, before the work was sent)
        assert "NOT_LEADER: not_leader" in caplog.text
        s = pool.stats()
        assert s.generation >= 1  # invalidated: every connection pointed at the old leader
        assert s.retries >= 1 and calls == 1
        assert rows(pool) == [1]  # landed once
    finally:
        pool.close()


def test_leadership_lost_during_commit(cluster: DqliteCluster) -> None:
    """SIGSTOP both followers, then commit on the leader: after a few seconds
    the driver reports LEADERSHIP_LOST (10506), yet once the followers are
    back the row is there: the "failed" commit was applied."""
    pool = make_pool(cluster, rpc_timeout=10.0, retry=Retry.off())  # longer than the server's ~3 s
    try:
        create_table(pool)
        leader = cluster.wait_for_leader()
        followers = [n for n in cluster.nodes if n is not leader]
        calls = 0

        def write(c: Any) -> None:
            nonlocal calls
            calls += 1
            c.cursor().execute("INSERT INTO t (id, v) VALUES (1, 'maybe')")
            for f in followers:
                cluster.pause(f)

        t0 = time.monotonic()
        with pytest.raises(AmbiguousCommitError) as info:
            pool.run(write)
        assert calls == 1  # no blind retry
        assert classify(info.value).category is Category.AMBIGUOUS
        cause = info.value.__cause__
        import dqlitedbapi

        assert getattr(cause, "code", None) in (10506, 8458) or isinstance(cause, dqlitedbapi.AmbiguousCommitError), (
            repr(cause)
        )
        assert time.monotonic() - t0 < 30
        for f in followers:
            cluster.resume(f)
        cluster.wait_for_leader()
        check = make_pool(cluster)
        present = rows(check)
        check.close()
        assert present == [1], present  # the "failed" commit was applied: a blind retry would write it twice
    finally:
        for n in cluster.nodes:
            if n.paused:
                cluster.resume(n)
        pool.close()


def test_leadership_lost_during_commit_with_a_request_id_is_exactly_once(cluster: DqliteCluster) -> None:
    pool = make_pool(cluster, rpc_timeout=10.0)
    try:
        create_table(pool)
        leader = cluster.wait_for_leader()
        followers = [n for n in cluster.nodes if n is not leader]
        calls = 0

        def resume_later() -> None:
            time.sleep(6)
            for f in followers:
                cluster.resume(f)

        def write(c: Any) -> None:
            nonlocal calls
            calls += 1
            c.cursor().execute("INSERT INTO t (id, v) VALUES (1, 'exactly once')")
            if calls == 1:
                for f in followers:
                    cluster.pause(f)
                threading.Thread(target=resume_later, daemon=True).start()

        pool.run(write, request_id="order-1")
        assert rows(pool) == [1]
        assert pool.run(write, request_id="order-1") is None  # finished: never again
        assert rows(pool) == [1]
    finally:
        for n in cluster.nodes:
            if n.paused:
                cluster.resume(n)
        pool.close()


def test_an_isolation_level_is_taken_with_a_request_id(cluster: DqliteCluster) -> None:
    # dqlite runs every transaction serializable: any level is had, and a
    # request id's ledger works under it
    pool = make_pool(cluster)
    try:
        create_table(pool)

        def write(c: Any) -> None:
            c.cursor().execute("INSERT INTO t (id, v) VALUES (7, 'serializable')")

        pool.run(write, request_id="iso-7", isolation_level="SERIALIZABLE")
        assert pool.run(write, request_id="iso-7", isolation_level="read committed") is None
        with pool.transaction(isolation_level="REPEATABLE READ") as c:
            c.cursor().execute("INSERT INTO t (id, v) VALUES (8, 'repeatable read')")
        assert rows(pool) == [7, 8]
    finally:
        pool.close()


def test_read_transaction_left_open_when_leadership_moves(cluster: DqliteCluster) -> None:
    pool = make_pool(cluster, max_size=1)
    try:
        create_table(pool)
        conn = pool.acquire()
        raw = conn.driver_connection
        cur = conn.cursor()
        cur.execute("BEGIN")
        cur.execute("SELECT count(*) FROM t").fetchall()
        assert raw.in_transaction
        cluster.kill(cluster.wait_for_leader())
        cluster.wait_for_leader()
        conn.close()  # rolled back, or discarded when the rollback cannot run
        pool.run(lambda c: c.cursor().execute("INSERT INTO t (id, v) VALUES (5, 'next')"))
        with pool.connection() as c2:
            assert not c2.driver_connection.in_transaction
        assert rows(pool) == [5]
    finally:
        pool.close()


def test_quorum_loss_fails_within_the_timeout_and_recovers(cluster: DqliteCluster) -> None:
    pool = Pool(poolkit.failover(*cluster.connects(timeout=1.0)), max_size=2, timeout=10, retry=BUDGET)
    try:
        create_table(pool)
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.nodes if n is not leader)
        down = [follower, leader]
        for n in down:
            cluster.kill(n)
        pool.invalidate()
        pool.reset_stats()
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            with pool.connection(timeout=3) as c:
                c.cursor().execute("SELECT 1")
        elapsed = time.monotonic() - t0
        assert elapsed < 3 + 3.5  # the timeout, plus at most one connect attempt in flight
        assert info.value.__cause__ is not None  # the last connect error says why
        assert pool.stats().connect_errors < 40  # backoff, not a spin
        for n in down:
            cluster.restart(n)
        cluster.wait_for_leader(timeout=60)
        assert rows(pool) == []  # the same pool serves again
    finally:
        pool.close()


@pytest.mark.soak
def test_exactly_once_under_repeated_leader_kills(cluster: DqliteCluster) -> None:
    pool = make_pool(cluster)
    total = 200
    try:
        create_table(pool)
        done = [0]
        errors: list[BaseException] = []

        def writer() -> None:
            for i in range(total):
                try:
                    pool.run(
                        lambda c, i=i: c.cursor().execute("INSERT INTO t (id, v) VALUES (?, 'x')", (i,)),
                        request_id=f"chaos-{i}",
                    )
                except BaseException as exc:
                    errors.append(exc)
                done[0] += 1

        t = threading.Thread(target=writer)
        t.start()
        kills = 0
        while t.is_alive() and kills < 3:
            time.sleep(0.5)
            leader = cluster.leader()
            if leader is None:
                continue
            cluster.kill(leader)
            kills += 1
            # Started again at once: the pool is to ride out the leader's
            # death, not this cluster's own recovery. Two survivors left to
            # elect alone (CI, once) still named the dead node as leader 60 s
            # later, as when a follower has not yet learnt that it votes.
            cluster.restart(leader)
            # all three voters again before the next kill: one node down at a
            # time (quorum loss has a test of its own)
            cluster.wait_ready(timeout=60)
        t.join(300)
        assert kills >= 1
        assert not errors, errors[:3]
        present = rows(pool)
        assert present == list(range(total))  # exactly 200, none twice, none lost
    finally:
        pool.close()


def test_sqlalchemy_plugin_on_dqlite(cluster: DqliteCluster) -> None:
    """The plugin under the sqlalchemy-dqlite dialect: Core and ORM, and a
    leader killed while the connection sat idle is never handed to a Session."""
    from sqlalchemy import Column, Integer, String, create_engine, text
    from sqlalchemy.orm import DeclarativeBase, Session

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id = Column(Integer, primary_key=True, autoincrement=False)
        name = Column(String(50))

    seeds = poolkit.failover(*cluster.connects(timeout=2.0))
    engine = create_engine(
        f"dqlite://{cluster.addresses[0]}/poolkit?check_same_thread=false&plugin=poolkit&poolkit_max_size=3",
        creator=seeds,
    )
    try:
        import poolkit.sqlalchemy as pksa

        assert isinstance(engine.pool, pksa.PoolkitPool)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO items (id, name) VALUES (1, 'core')"))
        with Session(engine) as s, s.begin():
            s.add(Item(id=2, name="orm"))
        with Session(engine) as s:
            assert sorted(i.name for i in s.query(Item)) == ["core", "orm"]
        cluster.kill(cluster.wait_for_leader())
        cluster.wait_ready()  # a new leader, and the cluster settled around it
        with Session(engine) as s:  # no error reaches the application
            assert s.query(Item).count() == 2
        assert engine.pool.poolkit.stats().closed_bad >= 1
    finally:
        engine.dispose()
