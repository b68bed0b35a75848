"""PyMySQL (MySQL and MariaDB)."""

from __future__ import annotations

from typing import Any

import pymysql

from poolkit.drivers._base import BROKEN, IDLE, IN_TRANSACTION, UNKNOWN, Driver, classify_generic, execute_each

SERVER_STATUS_IN_TRANS = 1
SERVER_STATUS_AUTOCOMMIT = 2
COM_RESET_CONNECTION = 0x1F  # MySQL >= 5.7.3, MariaDB >= 10.2.4

_CODE_RULES = {
    # the connection is gone
    2002: ("BAD_CONNECTION", "network"),  # can't connect through socket
    2003: ("BAD_CONNECTION", "network"),  # can't connect to server
    2006: ("BAD_CONNECTION", "network"),  # server has gone away
    2013: ("BAD_CONNECTION", "network"),  # lost connection during query
    2055: ("BAD_CONNECTION", "network"),  # lost connection at reading/writing
    2014: ("BAD_CONNECTION", "out_of_sync"),  # commands out of sync
    4031: ("BAD_CONNECTION", "idle_timeout"),  # disconnected for inactivity (MySQL 8)
    1927: ("BAD_CONNECTION", "killed"),  # MariaDB ER_CONNECTION_KILLED
    1053: ("BAD_CONNECTION", "server_shutdown"),
    # the node does not take writes
    1290: ("NOT_LEADER", "read_only"),  # --read-only
    1792: ("NOT_LEADER", "read_only"),  # read-only transaction
    1836: ("NOT_LEADER", "read_only"),  # read-only mode
    # transient conflicts
    1213: ("RETRYABLE", "deadlock"),
    1205: ("RETRYABLE", "lock_timeout"),
    # the request is at fault
    1062: ("PERMANENT", "integrity"),
    1451: ("PERMANENT", "integrity"),
    1452: ("PERMANENT", "integrity"),
    1048: ("PERMANENT", "integrity"),
    1064: ("PERMANENT", "syntax"),
    1146: ("PERMANENT", "syntax"),
}


class PyMySQLDriver(Driver):
    name = "pymysql"

    def socket_fd(self, conn: Any) -> int | None:
        sock = conn._sock
        return sock.fileno() if sock is not None else None

    def transaction_state(self, conn: Any) -> int:
        if conn._sock is None:
            return BROKEN
        result = conn._result
        if result is not None and result.unbuffered_active:
            return BROKEN  # an unbuffered result was not read to the end
        status = conn.server_status
        if status & SERVER_STATUS_IN_TRANS:
            return IN_TRANSACTION
        mode = conn.autocommit_mode
        if mode is not None and (not status & SERVER_STATUS_AUTOCOMMIT) is not (not mode):
            # SET autocommit sent as SQL, behind PyMySQL's back: the next
            # borrower's writes would commit as they ran (or, the other way,
            # never). Not IDLE, so the return puts it back (see rollback).
            return UNKNOWN
        return IDLE

    def rollback(self, conn: Any) -> None:
        conn.rollback()
        mode = conn.autocommit_mode
        if mode is not None and conn.get_autocommit() != bool(mode):
            conn.autocommit(mode)  # as the connection was opened, or set through the proxy

    # select_db(): the session's default database, which the next caller
    # would otherwise inherit (its unqualified tables in another database)
    setting_methods = frozenset({"autocommit", "select_db"})

    def get_setting(self, conn: Any, name: str) -> Any:
        if name == "autocommit":
            return conn.get_autocommit()
        if name == "select_db":
            return conn.db  # the database it was opened on (select_db does not change .db)
        return getattr(conn, name)

    def set_setting(self, conn: Any, name: str, value: Any) -> None:
        if name == "autocommit":
            conn.autocommit(value)
        elif name == "select_db":
            if value is None:
                raise ValueError("the connection was opened on no database, and MySQL has no way back to none")
            conn.select_db(value)
        else:
            setattr(conn, name, value)

    def ping(self, conn: Any, timeout: float) -> None:
        saved = conn._read_timeout, conn._write_timeout
        conn._read_timeout = conn._write_timeout = timeout
        try:
            conn.ping(reconnect=False)
        finally:
            conn._read_timeout, conn._write_timeout = saved

    def reset_session(self, conn: Any) -> None:
        conn._execute_command(COM_RESET_CONNECTION, b"")
        conn._read_ok_packet()
        # the reset keeps the default database: back to the one it was opened
        # on, in case a USE (or select_db) changed it
        if conn.db:
            conn.select_db(conn.db)
        # The reset puts every session variable back to the server's default,
        # and with them what PyMySQL's connect() set after the handshake: the
        # collation (a utf8mb4_unicode_ci connection compared as
        # utf8mb4_general_ci), sql_mode (a strict mode lost lets an INSERT
        # truncate instead of fail), init_command. Set up again, as connect() does.
        conn.set_character_set(conn.charset, conn.collation)
        setup = [] if conn.sql_mode is None else [f"SET sql_mode={conn.escape(conn.sql_mode)}"]
        if conn.init_command is not None:
            setup.append(conn.init_command)
        execute_each(conn, setup)
        conn.autocommit(conn.autocommit_mode)  # last, as connect(): the reset put it back to the server's

    def no_reconnect(self, conn: Any) -> dict[str, Any]:
        # ping()'s default was reconnect=True before PyMySQL 1.2, and
        # conn.ping(reconnect=True) is a common idiom
        return {"reconnect": False}

    def commits_first(self, conn: Any, name: str) -> bool:
        return name == "begin"  # MySQL commits the open transaction first

    def reconnects(self, conn: Any, name: str) -> bool:
        # connect() opens a new socket and session in place, and leaves the
        # old one open, with its transaction and locks, until collected
        return name == "connect"

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        # MySQL's SET TRANSACTION sets the level of the next transaction, and
        # is refused inside one: it goes first
        statements = [] if isolation_level is None else [f"SET TRANSACTION ISOLATION LEVEL {isolation_level}"]
        # The server's autocommit, as its last reply reported it, not
        # PyMySQL's mode: opened with autocommit=None (the server's default,
        # on), the mode is None, no BEGIN went, and each statement of the
        # work committed as it ran
        if conn.get_autocommit():
            statements.append("BEGIN")
        execute_each(conn, statements)

    def placeholder(self, conn: Any) -> str:
        return "%s"

    def ago(self, conn: Any, seconds: float) -> tuple[str, Any]:
        return "CURRENT_TIMESTAMP - INTERVAL %s SECOND", float(seconds)

    def is_broken(self, conn: Any) -> bool:
        return conn._sock is None

    def advice(self, conn: Any) -> str | None:
        # PyMySQL 1.2 asks for TLS when it may ("preferred", its default with
        # no ssl_* argument): each connect builds a new default context, which
        # loads the system's CA store (about 17 ms of CPU here, with the GIL
        # held), even where the server offers no TLS and it goes unused.
        preferred = getattr(conn, "ssl", False) and not getattr(conn, "_ssl_required", True)
        if preferred and not getattr(conn, "_secure", False):
            return (
                "PyMySQL built a TLS context for this connection (its default: TLS if the server "
                "offers it) and the server offered none: every connect spends about 15-20 ms of CPU, "
                "with the GIL held, loading CA certificates it does not use, and reconnects after a "
                "failover queue behind one another; pass ssl_disabled=True to pymysql.connect "
                "(SQLAlchemy: connect_args={'ssl_disabled': True})"
            )
        return None

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, pymysql.err.Error) and exc.args:
            code = exc.args[0]
            if isinstance(code, int):
                rule = _CODE_RULES.get(code)
                if rule is not None:
                    return rule
                if code == 0 and isinstance(exc, pymysql.err.InterfaceError):
                    return ("BAD_CONNECTION", "closed")  # PyMySQL's "(0, '')": no socket
        return classify_generic(exc)


DRIVER = PyMySQLDriver()
