"""dqlite through dqlite-dbapi (Python >= 3.13).

Driver facts designed for: statements autocommit unless a ``BEGIN`` is open
(so ``pool.run`` sends one); the wire session opens lazily (``open()`` opens
it now, so a seed that does not answer is found at once); a connection is
confined to its thread unless ``check_same_thread=False``; the client runs
an asyncio loop in a thread of its own that reads the socket, so liveness
is the client's own view of its transport, not a poll of the socket.
"""

from __future__ import annotations

from typing import Any

import dqlitedbapi

from poolkit.drivers._base import BROKEN, IDLE, IN_TRANSACTION, Driver, classify_generic

SQLITE_IOERR_NOT_LEADER = 10250
SQLITE_IOERR_NOT_LEADER_LEGACY = 8202
SQLITE_IOERR_LEADERSHIP_LOST = 10506
SQLITE_IOERR_LEADERSHIP_LOST_LEGACY = 8458
_NOT_LEADER = frozenset({SQLITE_IOERR_NOT_LEADER, SQLITE_IOERR_NOT_LEADER_LEGACY})
_LEADERSHIP_LOST = frozenset({SQLITE_IOERR_LEADERSHIP_LOST, SQLITE_IOERR_LEADERSHIP_LOST_LEGACY})
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
_GONE = (
    "connection closed by server",
    "wire session was lost",
    "not connected",
    "force-closed",
    "connection is closed",
    "failed to connect",
    "no leader",
    "connection lost",
    "timed out",
)


class DqliteDriver(Driver):
    name = "dqlite"

    def socket_fd(self, conn: Any) -> int | None:
        return None  # the client's event loop owns the socket: see alive()

    def alive(self, conn: Any) -> bool:
        """The client's own view of its transport: no syscall, no round trip."""
        if conn.closed:
            return False
        client = conn._async._client
        return client is None or bool(client.is_connected)

    def open(self, conn: Any) -> None:
        conn.connect()

    def transaction_state(self, conn: Any) -> int:
        if conn.closed:
            return BROKEN
        return IN_TRANSACTION if conn.in_transaction else IDLE

    def ping(self, conn: Any, timeout: float) -> None:
        cur = conn.cursor()
        try:
            cur.execute("SELECT 1")
            cur.fetchall()
        finally:
            cur.close()

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        # dqlite runs every transaction serializable, as SQLite does: any level is had
        if not conn.in_transaction:
            conn.cursor().execute("BEGIN")

    def placeholder(self, conn: Any) -> str:
        return "?"

    def ago(self, conn: Any, seconds: float) -> tuple[str, Any]:
        return "datetime('now', ?)", f"-{float(seconds)} seconds"

    def is_broken(self, conn: Any) -> bool:
        return bool(conn.closed)

    def check_config(self, conn: Any) -> None:
        if getattr(conn, "_check_same_thread", False):
            raise ValueError(
                "dqlite connections in a pool are used by more than one thread: "
                "open them with dqlitedbapi.connect(..., check_same_thread=False)"
            )

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, dqlitedbapi.AmbiguousCommitError):
            return ("AMBIGUOUS", "leadership_lost")
        if isinstance(exc, dqlitedbapi.Error):
            code = exc.code
            if code in _NOT_LEADER:
                return ("NOT_LEADER", "not_leader")
            if code in _LEADERSHIP_LOST:
                return ("AMBIGUOUS", "leadership_lost")
            if isinstance(code, int) and code & 0xFF in _BUSY:
                return ("RETRYABLE", "busy")
            if isinstance(exc, dqlitedbapi.IntegrityError):
                return ("PERMANENT", "integrity")
            if isinstance(exc, (dqlitedbapi.OperationalError, dqlitedbapi.InterfaceError)):
                text = str(exc).lower()
                if "not leader" in text:
                    return ("NOT_LEADER", "not_leader")
                if "leadership lost" in text:
                    return ("AMBIGUOUS", "leadership_lost")
                if "database is locked" in text or "busy" in text:
                    return ("RETRYABLE", "busy")
                if any(p in text for p in _GONE):
                    return ("BAD_CONNECTION", "network")
        return classify_generic(exc)


DRIVER = DqliteDriver()
