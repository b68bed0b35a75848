"""sqlite3, the standard library's embedded SQLite."""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

from poolkit.drivers._base import BROKEN, IDLE, IN_TRANSACTION, Driver, classify_generic

logger = logging.getLogger("poolkit.drivers")

_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (low byte of the extended code)
# sqlite3's autocommit before Python 3.12 (no such attribute): its legacy mode
_LEGACY = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", -1)


def _end(conn: Any, command: str) -> None:
    """End the open transaction with ``command`` (COMMIT or ROLLBACK). In
    autocommit mode (autocommit=True, Python 3.12+) sqlite3's commit() and
    rollback() do nothing, and a transaction begun in SQL (or by the pool's
    begin()) stayed open: the next borrower got it, and pool.run's commit
    committed nothing. The pool's own end of it is sent as SQL then."""
    if getattr(conn, "autocommit", None) is True:
        if conn.in_transaction:
            conn.execute(command)
    elif command == "COMMIT":
        conn.commit()
    else:
        conn.rollback()


class SQLite3Driver(Driver):
    name = "sqlite3"
    connect_can_hang = False  # no server: a busy database waits for its own timeout

    def socket_fd(self, conn: Any) -> int | None:
        return None

    def embedded(self, conn: Any) -> bool:
        return True  # a file (or memory) of this process: nothing cuts it while idle

    def transaction_state(self, conn: Any) -> int:
        try:
            return IN_TRANSACTION if conn.in_transaction else IDLE
        except sqlite3.ProgrammingError:
            return BROKEN  # closed

    def ping(self, conn: Any, timeout: float) -> None:
        conn.execute("SELECT 1").close()

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        # SQLite runs every transaction serializable: any level asked for is
        # had. sqlite3 itself begins one only before an INSERT, UPDATE,
        # DELETE or REPLACE (its default, "legacy" mode; in autocommit mode,
        # never): the reads before the first write ran outside it, each on a
        # snapshot of its own, and a read-modify-write lost updates. So the
        # transaction begins here, as sqlite3 would begin it (DEFERRED,
        # IMMEDIATE or EXCLUSIVE, its isolation_level), unless one is open
        # already (autocommit=False, Python 3.12+, keeps one open).
        if not conn.in_transaction:
            conn.execute(f"BEGIN {conn.isolation_level or ''}".rstrip())

    def rollback(self, conn: Any) -> None:
        _end(conn, "ROLLBACK")

    def commit(self, conn: Any) -> None:
        _end(conn, "COMMIT")

    def commits_first(self, conn: Any, name: str) -> bool:
        # executescript() commits a pending transaction first, unless the
        # connection is in one of Python 3.12's autocommit modes
        return name == "executescript" and getattr(conn, "autocommit", _LEGACY) == _LEGACY

    def keeps_transaction_open(self, conn: Any) -> bool:
        # autocommit=False (Python 3.12+): sqlite3 begins a transaction at
        # connect and again after each commit() and rollback()
        return getattr(conn, "autocommit", None) is False

    def placeholder(self, conn: Any) -> str:
        return "?"

    def ago(self, conn: Any, seconds: float) -> tuple[str, Any]:
        return "datetime('now', ?)", f"-{float(seconds)} seconds"

    def is_broken(self, conn: Any) -> bool:
        try:
            conn.total_changes  # noqa: B018 - raises on a closed connection
        except sqlite3.ProgrammingError:
            return True
        return False

    def check_config(self, conn: Any) -> None:
        # A pool hands a connection to whichever thread asks next: sqlite3's
        # default check_same_thread=True makes that fail on first use, far from
        # the cause. Find out now, from another thread.
        failure: list[BaseException] = []

        def probe() -> None:
            try:
                conn.execute("SELECT 1").close()
            except sqlite3.ProgrammingError as exc:
                failure.append(exc)

        t = threading.Thread(target=probe, name="poolkit-sqlite3-check")
        t.start()
        t.join()
        if failure:
            raise ValueError(
                "sqlite3 connections in a pool are used by more than one thread: "
                "open them with sqlite3.connect(..., check_same_thread=False)"
            ) from failure[0]
        # ":memory:": every connection the pool opens has a database of its
        # own, so what one checkout wrote, the next may not see
        try:
            in_memory = conn.execute("PRAGMA database_list").fetchone()[2] == ""
        except sqlite3.Error:
            return
        if in_memory:
            logger.warning(
                "sqlite3: the pool's connections are to an in-memory database: each has a database "
                "of its own (unless it is a shared-cache one, file::memory:?cache=shared with uri=True); "
                "use a file, or max_size=1"
            )

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if isinstance(code, int) and code & 0xFF in _BUSY_CODES:
                return ("RETRYABLE", "busy")
            if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
                return ("BAD_CONNECTION", "closed")
            if isinstance(exc, sqlite3.IntegrityError):
                return ("PERMANENT", "integrity")
        return classify_generic(exc)


DRIVER = SQLite3Driver()
