"""The databases the runner measures on, and how to kill their connections."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
# ssl_disabled: the server here offers no TLS, and PyMySQL's default would
# load the CA store on every connect (17 ms of CPU with the GIL held) for a
# context it then throws away: in the failover scenario every pool's recovery
# would measure that, not the pool. poolkit logs the same advice to its users.
DEFAULT_MYSQL = "host=127.0.0.1 port=3306 user=root password= database=test ssl_disabled=true"


# Every connection the runner opens is in autocommit mode: a SELECT 1 leaves
# no transaction behind, so no pool pays a rollback round trip on return that
# the raw floor does not.


@dataclass
class Backend:
    name: str
    connect: Callable[[], Any]
    dsn: str = ""
    admin: Any = None
    kills: bool = False  # whether the server can kill a connection
    ph: str = "%s"  # the driver's parameter marker
    cluster: Any = None  # dqlite: the DqliteCluster

    def server_id(self, raw: Any) -> int:
        if self.name == "postgresql":
            return int(raw.info.backend_pid)
        return int(raw.thread_id())

    def kill(self, raws: list[Any], wait: bool = True) -> int:
        """Kill these connections from the server side; returns how many.
        dqlite: SIGKILL the leader (every connection goes through it), and
        restart it once the others have elected a new one."""
        if self.cluster is not None:
            leader = self.cluster.leader()
            if leader is None:
                return 0
            self.cluster.kill(leader)

            def restart() -> None:
                # Two survivors have been seen still naming the dead node as
                # leader a minute on: restart it anyway, and the three elect.
                with contextlib.suppress(TimeoutError):
                    self.cluster.wait_for_leader(timeout=15)
                self.cluster.restart(leader)

            if wait:
                restart()
            else:
                threading.Thread(target=restart, daemon=True).start()
            return len(raws)
        ids = []
        for r in raws:
            try:
                ids.append(self.server_id(r))
            except Exception:
                continue  # closed already
        if not ids:
            return 0
        if self.name == "postgresql":
            self.admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (ids,))
        else:
            with self.admin.cursor() as cur:
                for i in ids:
                    try:
                        cur.execute(f"KILL {i:d}")
                    except Exception:
                        pass  # already gone
        if wait:
            deadline = time.monotonic() + 5
            while self.alive(ids) and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)
        return len(ids)

    def alive(self, ids: list[int]) -> int:
        if self.name == "postgresql":
            return len(self.admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (ids,)).fetchall())
        with self.admin.cursor() as cur:
            marks = ",".join(["%s"] * len(ids))
            cur.execute(f"SELECT id FROM information_schema.processlist WHERE id IN ({marks})", ids)
            return len(cur.fetchall())

    def execute(self, sql: str) -> list[Any]:
        if self.name == "dqlite":
            # a fresh connection each time (the leader may have been killed), through an election
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = self.connect()
                    try:
                        cur = conn.cursor()
                        cur.execute(sql)
                        return list(cur.fetchall()) if cur.description else []
                    finally:
                        conn.close()
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        if self.name == "postgresql":
            cur = self.admin.execute(sql)
            return cur.fetchall() if cur.description else []
        if self.name == "mariadb":
            with self.admin.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        cur = self.admin.execute(sql)
        rows = list(cur.fetchall())
        self.admin.commit()
        return rows

    def close(self) -> None:
        if self.admin is not None:
            try:
                self.admin.close()
            except Exception:
                pass
        if self.cluster is not None:
            self.cluster.stop()


_MYSQL_INTS = frozenset({"port", "connect_timeout", "read_timeout", "write_timeout"})
_MYSQL_BOOLS = frozenset({"ssl_disabled", "ssl_verify_cert", "ssl_verify_identity"})


def _mysql_args(dsn: str) -> dict[str, Any]:
    """PyMySQL's keyword arguments from ``key=value key=value``."""
    args: dict[str, Any] = {}
    for part in dsn.split():
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"benchmarks: MariaDB DSN: {part!r} is not key=value")
        if key in _MYSQL_INTS:
            args[key] = int(value)
        elif key in _MYSQL_BOOLS:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"benchmarks: MariaDB DSN: {key} must be true or false, not {value!r}")
            args[key] = value.lower() in ("true", "1")
        else:
            args[key] = value
    return args


def open_backend(name: str, dsn: str | None) -> Backend:
    if name == "sqlite":
        path = dsn or os.path.join(tempfile.mkdtemp(prefix="poolkit-bench-"), "bench.db")
        connect = functools.partial(sqlite3.connect, path, check_same_thread=False, timeout=5, isolation_level=None)
        admin: Any = sqlite3.connect(path, check_same_thread=False)
        return Backend("sqlite", connect, dsn=path, admin=admin)
    if name == "postgresql":
        import psycopg

        dsn = dsn or os.environ.get("POOLKIT_PG_DSN", DEFAULT_PG_DSN)
        admin = psycopg.connect(dsn, autocommit=True)
        return Backend(
            "postgresql", functools.partial(psycopg.connect, dsn, autocommit=True), dsn=dsn, admin=admin, kills=True
        )
    if name == "mariadb":
        import pymysql

        dsn = dsn or os.environ.get("POOLKIT_MYSQL_DSN", DEFAULT_MYSQL)
        args = _mysql_args(dsn)
        admin = pymysql.connect(**args, autocommit=True)
        return Backend(
            "mariadb", functools.partial(pymysql.connect, **args, autocommit=True), dsn=dsn, admin=admin, kills=True
        )
    if name == "dqlite":
        if sys.version_info < (3, 13):
            raise SystemExit(
                "benchmarks: the dqlite backend needs Python >= 3.13 (dqlite-dbapi): run it with python3.13"
            )
        import poolkit
        from poolkit.testing.dqlite import DqliteCluster

        if dsn:  # an existing cluster: comma-separated node addresses
            import dqlitedbapi

            connects = [
                functools.partial(dqlitedbapi.connect, a.strip(), database="bench", check_same_thread=False)
                for a in dsn.split(",")
            ]
            cluster = None
        else:  # a fresh 3-node cluster of dqlite-demo processes, stopped at the end
            cluster = DqliteCluster(3).start()
            connects = cluster.connects(database="bench")
        connect = poolkit.failover(*connects)
        return Backend(
            "dqlite",
            connect,
            dsn=dsn or ",".join(cluster.addresses),
            admin=connect(),
            kills=cluster is not None,
            ph="?",
            cluster=cluster,
        )
    raise SystemExit(f"benchmarks: unknown backend {name!r} (sqlite, postgresql, mariadb, dqlite)")
