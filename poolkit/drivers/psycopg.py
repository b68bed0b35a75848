"""psycopg 3."""

from __future__ import annotations

import select
import time
from typing import Any

import psycopg
from psycopg import pq

from poolkit.drivers._base import BROKEN, IDLE, IN_TRANSACTION, Driver, classify_generic

# What reset_session sends: DISCARD ALL without its DEALLOCATE ALL (psycopg
# keeps track of the statements it prepared and would not know they were
# gone) and without the transaction-block restriction of DISCARD ALL.
RESET_SQL = (
    b"CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;"
    b" SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD SEQUENCES; DISCARD TEMP"
)

_OK_RESULTS = (pq.ExecStatus.EMPTY_QUERY, pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)

# libpq transaction status -> poolkit state. Keyed by plain int: the status
# arrives as an int, and looking an int up among IntEnum keys takes the slow
# comparison (this runs on every return).
_TX_STATE = {
    int(pq.TransactionStatus.IDLE): IDLE,
    int(pq.TransactionStatus.INTRANS): IN_TRANSACTION,
    int(pq.TransactionStatus.INERROR): IN_TRANSACTION,
    int(pq.TransactionStatus.ACTIVE): BROKEN,  # a query is still running
    int(pq.TransactionStatus.UNKNOWN): BROKEN,  # the connection is bad
}

_SQLSTATE_RULES = {
    "25006": ("NOT_LEADER", "read_only"),  # read_only_sql_transaction: a standby or demoted primary
    "40001": ("RETRYABLE", "serialization"),
    "40P01": ("RETRYABLE", "deadlock"),
    "55P03": ("RETRYABLE", "lock_timeout"),
    "40003": ("AMBIGUOUS", "statement_completion_unknown"),
    "57P01": ("BAD_CONNECTION", "server_shutdown"),  # admin_shutdown (pg_terminate_backend too)
    "57P02": ("BAD_CONNECTION", "server_shutdown"),  # crash_shutdown
    "57P03": ("BAD_CONNECTION", "server_starting"),  # cannot_connect_now
    # the server ended the session (FATAL): the connection is gone
    "25P03": ("BAD_CONNECTION", "idle_in_transaction_timeout"),  # idle_in_transaction_session_timeout
    "25P04": ("BAD_CONNECTION", "transaction_timeout"),  # transaction_timeout (PostgreSQL 17)
    "57P05": ("BAD_CONNECTION", "idle_session_timeout"),  # idle_session_timeout (PostgreSQL 14)
}
# Severities of an error after which the server has ended the session
_SESSION_ENDED = frozenset({"FATAL", "PANIC"})


def _begin_command(conn: Any, isolation_level: str | None) -> str:
    """psycopg's own BEGIN for ``conn`` (its isolation_level, read_only and
    deferrable), at ``isolation_level`` if one is given."""
    parts = ["BEGIN"]
    if isolation_level is None and conn.isolation_level is not None:
        isolation_level = psycopg.IsolationLevel(conn.isolation_level).name.replace("_", " ")
    if isolation_level is not None:
        parts.append(f"ISOLATION LEVEL {isolation_level}")
    if conn.read_only is not None:
        parts.append("READ ONLY" if conn.read_only else "READ WRITE")
    if conn.deferrable is not None:
        parts.append("DEFERRABLE" if conn.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def _exec(conn: Any, sql: bytes) -> None:
    """Run the pool's own ``sql`` at the libpq level, past psycopg's
    transaction handling (its BEGIN, its prepared statements); a failure is
    raised as psycopg would raise it: the class of its SQLSTATE, or
    OperationalError for a client-side failure (no SQLSTATE: the connection
    is lost)."""
    res = conn.pgconn.exec_(sql)
    if res.status in _OK_RESULTS:
        return
    message = (res.error_message or b"").decode(errors="replace").strip() or f"{sql[:40]!r} failed"
    sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
    if sqlstate:
        try:
            cls = psycopg.errors.lookup(sqlstate.decode())
        except KeyError:
            cls = psycopg.DatabaseError
        raise cls(message)
    raise psycopg.OperationalError(message)


class PsycopgDriver(Driver):
    name = "psycopg"

    def socket_fd(self, conn: Any) -> int | None:
        try:
            return int(conn.pgconn.socket)
        except psycopg.OperationalError:
            return None

    def transaction_state(self, conn: Any) -> int:
        return _TX_STATE.get(conn.pgconn.transaction_status, BROKEN)

    def ping(self, conn: Any, timeout: float) -> None:
        # An empty query at the libpq level, waited for with a deadline: psycopg's
        # own execute() would wait for a blackholed server forever.
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        pgconn = conn.pgconn
        deadline = time.monotonic() + timeout
        pgconn.send_query(b"")
        fd = pgconn.socket
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ping got no answer within {timeout:g}s")
            select.select([fd], [], [], remaining)
        error = None
        while (res := pgconn.get_result()) is not None:
            if res.status not in _OK_RESULTS and error is None:
                error = res.error_message.decode(errors="replace")
        if error is not None:
            raise psycopg.OperationalError(f"ping failed: {error}")

    def reset_session(self, conn: Any) -> None:
        _exec(conn, RESET_SQL)

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        level = "" if isolation_level is None else f" ISOLATION LEVEL {isolation_level}"
        if conn.autocommit:
            conn.execute(f"BEGIN{level}")
        elif conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            # psycopg would send its own BEGIN before the first statement,
            # as a round trip of its own: it is sent now instead, so that a
            # conn.transaction() block that comes first in the work is a
            # savepoint of this transaction, not a transaction of its own
            # that commits at its end (pool.run would retry what it
            # committed). The same command psycopg sends, at the level asked.
            _exec(conn, _begin_command(conn, isolation_level).encode())
        elif level:
            conn.execute(f"SET TRANSACTION{level}")

    def placeholder(self, conn: Any) -> str:
        return "%s"

    def is_broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def read_only_by_caller(self, conn: Any) -> bool:
        return conn.read_only is True  # psycopg begins its transactions READ ONLY

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, psycopg.Error):
            state = exc.sqlstate
            if state:
                rule = _SQLSTATE_RULES.get(state)
                if rule is not None:
                    return rule
                if state.startswith("08"):
                    return ("BAD_CONNECTION", "network")
                if state.startswith("23"):
                    return ("PERMANENT", "integrity")
                if state.startswith("42"):
                    return ("PERMANENT", "syntax")
                diag = exc.diag
                if (diag.severity_nonlocalized or diag.severity) in _SESSION_ENDED:
                    # the server answered, and then ended the session
                    return ("BAD_CONNECTION", "session_ended")
                # the server answered, so the connection works
                return ("PERMANENT", "server_error")
            if isinstance(exc, psycopg.OperationalError):
                # no SQLSTATE: raised by libpq on the client side, not by the server
                # ("consuming input failed", "connection socket closed", timeouts...)
                return ("BAD_CONNECTION", "network")
            if isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc).lower():
                return ("BAD_CONNECTION", "closed")
        return classify_generic(exc)


DRIVER = PsycopgDriver()
