"""A fake PEP 249 driver with scripted faults, for fast deterministic unit
tests (after Go's fakedb_test.go).

Each connection owns one end of a real socketpair, so the pool's liveness
probe polls a real file descriptor: ``conn.kill()`` closes the "server" end
and the probe sees the hang-up exactly as it would on a socket cut by a
server.
"""

from __future__ import annotations

import itertools
import socket
import threading
from typing import Any

from poolkit.drivers import IDLE, IN_TRANSACTION, Driver, register_driver

apilevel = "2.0"
threadsafety = 2
paramstyle = "qmark"


class Error(Exception):
    pass


class DatabaseError(Error):
    pass


class OperationalError(DatabaseError):
    def __init__(self, msg: str = "", code: int | None = None) -> None:
        super().__init__(msg)
        self.code = code


class IntegrityError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class Server:
    """Scripted behaviour shared by every connection of one fake database."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.connections: list[FakeConnection] = []
        self.connect_errors: list[BaseException] = []  # raised by the next connects, in order
        self.down = False  # every connect fails
        self.connect_hook: Any = None  # called (in the connecting thread) before a connect returns
        self.execute_errors: dict[str, BaseException] = {}  # SQL text -> error
        self.commit_error: BaseException | None = None
        self.ping_error: BaseException | None = None
        # the server stops answering: rollback / reset_session wait on the socket
        self.rollback_hangs = False
        self.reset_hangs = False
        self.ping_hangs = False
        self.committed: list[str] = []

    def connect(self) -> FakeConnection:
        hook = self.connect_hook
        if hook is not None:
            hook()
        with self.lock:
            if self.down:
                raise OperationalError("connection refused", code=2003)
            if self.connect_errors:
                raise self.connect_errors.pop(0)
            conn = FakeConnection(self, next(self.ids))
            self.connections.append(conn)
            return conn

    @property
    def open_connections(self) -> list[FakeConnection]:
        with self.lock:
            return [c for c in self.connections if not c.closed]


class FakeConnection:
    def __init__(self, server: Server, cid: int) -> None:
        self.server = server
        self.id = cid
        self.closed = False
        self.in_transaction = False
        self.autocommit = False
        self.session: dict[str, Any] = {}
        self.pending: list[str] = []
        self.rollbacks = 0
        self.pings = 0
        self.resets = 0
        self._client, self._server_end = socket.socketpair()

    # what the pool's probe polls
    def fileno(self) -> int:
        return self._client.fileno()

    def kill(self) -> None:
        """The server drops the connection: the socket hangs up."""
        self._server_end.close()
        self.dead = True

    dead = False

    def _check(self) -> None:
        if self.closed:
            raise ProgrammingError("Cannot operate on a closed database.")
        if self.dead:
            raise OperationalError("server closed the connection unexpectedly")

    def cursor(self) -> FakeCursor:
        self._check()
        return FakeCursor(self)

    def commit(self) -> None:
        self._check()
        err = self.server.commit_error
        if err is not None:
            self.server.commit_error = None
            raise err
        self.server.committed.extend(self.pending)
        self.pending = []
        self.in_transaction = False

    def wait_for_answer(self) -> None:
        """Wait for a server that does not answer: until the socket is shut
        down (by the pool's cut), which ends it as a dead server would."""
        self._client.settimeout(10)
        if not self._client.recv(1):
            self.dead = True
            raise OperationalError("server closed the connection unexpectedly")

    def rollback(self) -> None:
        self._check()
        if self.server.rollback_hangs:
            self.wait_for_answer()
        self.rollbacks += 1
        self.pending = []
        self.in_transaction = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._client.close()
            try:
                self._server_end.close()
            except OSError:
                pass


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.rows: list[tuple[Any, ...]] = []
        self.description = None
        self.rowcount = -1
        self.arraysize = 1

    def execute(self, sql: str, params: Any = ()) -> None:
        self.conn._check()
        err = self.conn.server.execute_errors.get(sql)
        if err is not None:
            raise err
        if sql == "SELECT 1":
            self.rows = [(1,)]
        elif sql.startswith("SET "):
            key, _, value = sql[4:].partition("=")
            self.conn.session[key.strip()] = value.strip()
            self.rows = []
        elif sql.startswith("SHOW "):
            self.rows = [(self.conn.session.get(sql[5:].strip()),)]
        else:
            self.conn.in_transaction = not self.conn.autocommit
            self.conn.pending.append(sql)
            if self.conn.autocommit:
                self.conn.server.committed.append(sql)
                self.conn.pending = []
            self.rows = []
        self.rowcount = len(self.rows)

    def executemany(self, sql: str, seq: Any) -> None:
        for params in seq:
            self.execute(sql, params)

    def fetchone(self) -> Any:
        self.conn._check()
        return self.rows.pop(0) if self.rows else None

    def fetchall(self) -> list[Any]:
        self.conn._check()
        rows, self.rows = self.rows, []
        return rows

    def fetchmany(self, size: int | None = None) -> list[Any]:
        n = self.arraysize if size is None else size
        rows, self.rows = self.rows[:n], self.rows[n:]
        return rows

    def close(self) -> None:
        pass


class FakeDriver(Driver):
    """What poolkit knows about the fake: its transaction flag, its ping
    (scriptable) and its session reset."""

    name = "fakedb"

    def transaction_state(self, conn: Any) -> int:
        if conn.closed:
            from poolkit.drivers import BROKEN

            return BROKEN
        return IN_TRANSACTION if conn.in_transaction else IDLE

    def ping(self, conn: Any, timeout: float) -> None:
        # no deadline of its own, as a generic driver's: the pool's cut ends it
        if conn.server.ping_hangs:
            conn.wait_for_answer()
        conn.pings += 1
        conn._check()
        err = conn.server.ping_error
        if err is not None:
            raise err

    def reset_session(self, conn: Any) -> None:
        if conn.server.reset_hangs:
            conn.wait_for_answer()
        conn.resets += 1
        conn.session.clear()

    def placeholder(self, conn: Any) -> str:
        return "?"

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        code = getattr(exc, "code", None)
        if code == 25006:
            return ("NOT_LEADER", "read_only")
        if code == 40001:
            return ("RETRYABLE", "serialization")
        if code == 2013:
            return ("BAD_CONNECTION", "network")
        return super().classify_one(exc)


class EmbeddedFakeDriver(FakeDriver):
    """The fake as if its database lived in the process, as sqlite3's does
    (Driver.embedded): pass it as a pool's ``driver``."""

    name = "fakedb-embedded"

    def embedded(self, conn: Any) -> bool:
        return True


register_driver(__name__.partition(".")[0], FakeDriver())
