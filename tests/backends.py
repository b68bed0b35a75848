"""The real database servers the integration tests use, and how to do to
them what production does: kill a connection from the server side, find a
connection's server-side id, count a pool's connections on the server."""

from __future__ import annotations

import functools
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PG_DSN = os.environ.get("POOLKIT_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
MYSQL_ARGS: dict[str, Any] = {
    "host": os.environ.get("POOLKIT_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("POOLKIT_MYSQL_PORT", "3306")),
    "user": os.environ.get("POOLKIT_MYSQL_USER", "root"),
    "password": os.environ.get("POOLKIT_MYSQL_PASSWORD", ""),
    "database": os.environ.get("POOLKIT_MYSQL_DB", "test"),
    # The server here offers no TLS: without this, PyMySQL loads the CA store
    # for a context it does not use, 17 ms a connect (see Driver.advice)
    "ssl_disabled": True,
}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: POOLKIT_TEST_DELAY=0.002 runs every integration test with that delay injected
#: before every execute, fetch and commit (tox -e delays): races show up.
DELAY = float(os.environ.get("POOLKIT_TEST_DELAY", "0") or 0)


def with_delays(connect: Callable[[], Any]) -> Callable[[], Any]:
    if not DELAY:
        return connect
    from poolkit.testing import Delay, Faulty

    faulty = Faulty(connect)
    for point in ("execute", "fetch", "commit"):
        faulty.inject(point, Delay(DELAY, jitter=DELAY))
    return faulty.connect


def start_servers() -> None:
    """Start PostgreSQL / MariaDB if they are down (scripts/servers)."""
    subprocess.run(["bash", os.path.join(_ROOT, "scripts", "servers")], check=False, timeout=120)


@dataclass
class Backend:
    name: str
    connect: Callable[[], Any]
    admin: Any = None  # an autocommit connection outside any pool
    extra: dict[str, Any] = field(default_factory=dict)
    # The admin connection is shared by a test and its killer threads, and a
    # PyMySQL connection is not thread-safe: one statement at a time.
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- server-side identity and killing
    def server_id(self, raw: Any) -> int:
        if self.name == "postgresql":
            return int(raw.info.backend_pid)
        if self.name == "mariadb":
            return int(raw.thread_id())
        raise NotImplementedError(self.name)

    def alive_ids(self, ids: list[int]) -> set[int]:
        if not ids:
            return set()
        if self.name == "postgresql":
            rows = self.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (ids,))
        else:
            marks = ",".join(["%s"] * len(ids))
            rows = self.execute(f"SELECT id FROM information_schema.processlist WHERE id IN ({marks})", ids)
        return {int(r[0]) for r in rows}

    def kill(self, raw: Any, *, wait: bool = True) -> None:
        """Kill the connection from the server side, as a DBA, a proxy or a
        restart would, and wait until the server has really let it go."""
        sid = self.server_id(raw)
        if self.name == "postgresql":
            self.execute("SELECT pg_terminate_backend(%s)", (sid,))
        else:
            self.execute(f"KILL {sid:d}")
        if wait:
            deadline = time.monotonic() + 10
            while sid in self.alive_ids([sid]):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: connection {sid} still alive 10s after kill")
                time.sleep(0.01)
            time.sleep(0.02)  # let the FIN reach the client socket

    def execute(self, sql: str, params: Any = None) -> list[Any]:
        """Run SQL on the admin connection, outside any pool."""
        with self.lock:
            if self.name == "postgresql":
                cur = self.admin.execute(sql, params)
                return cur.fetchall() if cur.description else []
            if self.name == "mariadb":
                with self.admin.cursor() as cur:
                    cur.execute(sql, params)
                    return list(cur.fetchall())
            cur = self.admin.execute(sql, params or ())
            rows = cur.fetchall()
            self.admin.commit()
            return rows

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


def postgresql() -> Backend:
    import psycopg

    admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    return Backend("postgresql", with_delays(functools.partial(psycopg.connect, PG_DSN, connect_timeout=3)), admin)


def mariadb() -> Backend:
    import pymysql

    admin = pymysql.connect(**MYSQL_ARGS, autocommit=True, connect_timeout=3)
    return Backend("mariadb", with_delays(functools.partial(pymysql.connect, **MYSQL_ARGS, connect_timeout=3)), admin)


def sqlite(path: str) -> Backend:
    connect = functools.partial(sqlite3.connect, path, check_same_thread=False, timeout=0.2)
    admin = sqlite3.connect(path, check_same_thread=False)
    return Backend("sqlite", with_delays(connect), admin, extra={"path": path})
