"""The generic driver: what any PEP 249 driver supports."""

from __future__ import annotations

import errno
import select
import sys
from collections.abc import Callable
from typing import Any

# Transaction states, as plain ints: the release path reads one per checkin.
IDLE = 0  # nothing to undo
IN_TRANSACTION = 1  # roll back before reuse
UNKNOWN = 2  # the driver cannot tell: roll back to be sure
BROKEN = 3  # the connection cannot be reused (closed, mid-query, state unknowable)

# The liveness probe of a connection with a socket. Every probe has the
# signature of ``select.epoll``: ``poll(0, 1)`` is truthy when the socket is
# readable or hung up (data or a FIN arrived while idle), and ``close()``
# frees it. An epoll set of one costs a file descriptor per connection and is
# the cheapest of the checks measured on these machines: 0.17 us, against
# 0.25 us for select.poll (epoll_wait reads a ready list; poll() asks the
# socket). It is tied to the socket, not to the descriptor's number, so it
# never probes another file that reused the number. The other side of that:
# a socket the driver closed itself drops out of the set silently, where
# poll() would say POLLNVAL; drivers close their sockets only while in use,
# on an error, and the transaction-state read on return (closed or broken:
# BROKEN) discards such a connection before it is idle again.
_POLL_EVENTS = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)


class _PollProbe:
    """``select.poll`` behind the probe's signature: where there is no epoll,
    or no descriptor is left for one."""

    __slots__ = ("_poll",)

    def __init__(self, fd: int) -> None:
        self._poll = select.poll()
        self._poll.register(fd, _POLL_EVENTS)

    def poll(self, timeout: float, maxevents: int = -1) -> Any:
        return self._poll.poll(timeout)

    def close(self) -> None:
        pass


_EPOLL_EVENTS = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP if hasattr(select, "epoll") else 0


def socket_probe(fd: int) -> Any:
    """The liveness probe of the socket ``fd``: ``poll(0, 1)`` is truthy when
    it is readable or hung up; ``close()`` frees it."""
    if _EPOLL_EVENTS:
        try:
            probe = select.epoll()
        except OSError:  # out of descriptors (EMFILE): poll() needs none
            return _PollProbe(fd)
        try:
            probe.register(fd, _EPOLL_EVENTS)
        except OSError:  # a descriptor epoll cannot watch (EPERM), or ENOMEM
            probe.close()
            return _PollProbe(fd)
        return probe
    return _PollProbe(fd)  # pragma: no cover - not Linux


NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)

# Message fragments that mean the connection is gone, for drivers that raise
# a bare OperationalError/InterfaceError without a code.
DISCONNECT_PHRASES = (
    "server closed the connection",
    "connection is closed",
    "connection already closed",
    "connection was closed",
    "lost connection",
    "has gone away",
    "broken pipe",
    "connection reset",
    "connection refused",
    "connection closed by server",
    "terminating connection",
    "cannot operate on a closed",
)


#: the isolation levels ``Driver.begin`` takes (see ``pool.run``)
ISOLATION_LEVELS = ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")


class Driver:
    """Support for one DB-API driver. The base class is the generic fallback.

    Subclass it and :func:`poolkit.drivers.register_driver` it to teach
    poolkit about another driver or to change a rule of a built-in one.
    """

    #: short name, used in logs and stats
    name = "generic"
    #: whether a connect can hang on a server that does not answer (any
    #: driver that talks to one over a network). The pool then connects in
    #: a thread of its own, so that a caller waits no longer than its
    #: timeout; an embedded database (sqlite3) connects in the caller's.
    connect_can_hang = True
    #: what the pool's ``connect`` callable is, to the user, in the error
    #: that refuses a new connection it returned in a transaction
    connect_is = "connect"

    def socket_fd(self, conn: Any) -> int | None:
        """The file descriptor of the connection's socket, for the liveness
        probe, or None when there is none (embedded databases) or it cannot
        be found."""
        fileno = getattr(conn, "fileno", None)
        if callable(fileno):
            try:
                fd = fileno()
            except Exception:
                return None
            return fd if isinstance(fd, int) and fd >= 0 else None
        return None

    def embedded(self, conn: Any) -> bool:
        """Whether the database lives in this process (sqlite3), so that no
        network, proxy or server can cut the connection while it sits idle.
        The checkout's fast path then judges its idle time and lifetime by
        the pool's clock as the maintenance thread last read it, a tick ago
        at most (see ``Pool._tick_clock``), which saves a clock read; a
        connection to a server, by the clock itself, so that one idle through
        a pause of the whole process (a frozen container, an AWS Lambda
        between requests), when the maintenance thread could not tick, is
        pinged as soon as the process thaws. The default: not embedded."""
        return False

    def cut_fd(self, conn: Any) -> int | None:
        """The socket the pool shuts down to cut a wait for a server that
        does not answer (see ``Pool._guarded_wait``); None: not to be cut.
        The probe's socket, unless the probe goes another way."""
        return self.socket_fd(conn)

    def alive(self, conn: Any) -> bool:
        """For drivers without a socket to poll (``socket_fd`` None): a check
        that costs no round trip. The default says nothing (True)."""
        return True

    def open(self, conn: Any) -> None:
        """Make sure a new connection really reached the server (for drivers
        that connect lazily); raise if it did not."""

    def transaction_state(self, conn: Any) -> int:
        """One of IDLE, IN_TRANSACTION, UNKNOWN, BROKEN.

        Called on every return (and after each statement of ``pool.run``'s
        work), for every connection, even one about to be closed: read the
        state the driver keeps (psycopg's ``pgconn.transaction_status``,
        PyMySQL's ``server_status``), never ask the server. The default,
        UNKNOWN, has each returned connection rolled back."""
        return UNKNOWN

    def rollback(self, conn: Any) -> None:
        """Roll back the connection's open transaction (on return to the
        pool, and a failed ``pool.run`` or ``pool.transaction``)."""
        conn.rollback()

    def commit(self, conn: Any) -> None:
        """Commit the transaction ``pool.run`` or ``pool.transaction`` began."""
        conn.commit()

    def no_reconnect(self, conn: Any) -> dict[str, Any]:
        """Keyword arguments that keep the connection's own ``ping()`` from
        reconnecting (PyMySQL's ``reconnect``): a pooled connection must not
        become a new session behind the pool's back."""
        return {}

    def read_only_by_caller(self, conn: Any) -> bool:
        """Whether the connection's transactions are read-only because the
        caller made them so (psycopg's ``conn.read_only = True``): then a
        write refused as read-only is the caller's mistake (PERMANENT), not
        a node that stopped taking writes (NOT_LEADER, which invalidates the
        pool and moves a failover to the next node)."""
        return False

    def commits_first(self, conn: Any, name: str) -> bool:
        """Whether the method ``name`` of the connection (or of its cursors)
        commits the open transaction before it does anything else (PyMySQL's
        ``begin()``, sqlite3's ``executescript()`` outside its 3.12+
        ``autocommit`` modes): refused inside ``pool.run`` and
        ``pool.transaction``, whose transaction it would end half way."""
        return False

    def reconnects(self, conn: Any, name: str) -> bool:
        """Whether the connection's method ``name`` opens a new session in
        place of its own (PyMySQL's ``connect()``): the proxy does not hand
        it out. The pool's checks, its probe and its cut watch the socket
        the pool opened, and a transaction of ``pool.run`` would go on in a
        session that commits what the first half never wrote."""
        return False

    def keeps_transaction_open(self, conn: Any) -> bool:
        """Whether the connection has a transaction open at all times, a new
        one begun as the last ends (sqlite3's ``autocommit=False``): one
        open after ``configure`` then holds nothing of it."""
        return False

    #: settings the driver's connection changes through a method of that
    #: name (PyMySQL's ``conn.autocommit(True)``), not by assignment
    setting_methods: frozenset[str] = frozenset()

    def setting_is_method(self, conn: Any, name: str) -> bool:
        """Whether ``conn`` changes the setting ``name`` by a method call
        (see ``setting_methods``)."""
        return name in self.setting_methods

    def get_setting(self, conn: Any, name: str) -> Any:
        """The value of the connection setting ``name`` (``autocommit``,
        ``isolation_level``, ``row_factory``...): the pool saves it before a
        caller changes it, and puts it back when the connection returns."""
        return getattr(conn, name)

    def set_setting(self, conn: Any, name: str, value: Any) -> None:
        """Change the connection setting ``name`` (see :meth:`get_setting`)."""
        setattr(conn, name, value)

    def ping(self, conn: Any, timeout: float) -> None:
        """Raise if the connection is not usable. A generic driver gives no
        way to bound the wait, so ``timeout`` is advisory here: the pool
        cuts a connection whose server has not answered by then (see
        ``Pool._guarded_wait``), if it has a socket."""
        cur = conn.cursor()
        try:
            cur.execute("SELECT 1")
            cur.fetchall()
        finally:
            cur.close()
        # the SELECT may have opened a transaction on drivers without autocommit
        conn.rollback()

    def reset_session(self, conn: Any) -> None:
        """Make a used connection look fresh: session variables, temporary
        tables, locks. The generic driver knows no way to do it."""

    def resets_session(self, conn: Any) -> bool:
        """Whether :meth:`reset_session` does anything for ``conn``."""
        return type(self).reset_session is not Driver.reset_session

    def is_broken(self, conn: Any) -> bool:
        """Whether the connection reports itself closed or broken."""
        return bool(getattr(conn, "closed", False))

    def check_interface(self, conn: Any) -> None:
        """Called once per pool on its first connection: raise TypeError if
        it is not a DB-API connection (a connect that returns the wrong
        thing fails here, not at its first use, with its cause named)."""
        missing = [m for m in ("cursor", "commit", "rollback", "close") if not callable(getattr(conn, m, None))]
        if missing:
            kind = type(conn)
            raise TypeError(
                f"connect returned a {kind.__module__}.{kind.__qualname__}, not a DB-API connection: "
                f"it has no {', '.join(m + '()' for m in missing)}"
            )

    def check_config(self, conn: Any) -> None:
        """Called once per pool on its first connection; raise ValueError
        for a connection that a pool cannot share across threads."""

    def advice(self, conn: Any) -> str | None:
        """Called once per pool on its first connection: what in the way it
        was opened costs the pool dearly, and what to do instead; the pool
        logs it at WARNING. None: nothing to say."""
        return None

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        """Make sure what follows runs in one transaction. DB-API drivers
        open one implicitly, unless the connection is in autocommit mode.
        ``isolation_level`` (one of :data:`ISOLATION_LEVELS`; passed only
        when asked for): the level of that one transaction. Standard SQL
        here: ``SET TRANSACTION`` as its first statement."""
        statements = ["BEGIN"] if getattr(conn, "autocommit", False) is True else []
        if isolation_level is not None:
            statements.append(f"SET TRANSACTION ISOLATION LEVEL {isolation_level}")
        execute_each(conn, statements)

    def placeholder(self, conn: Any) -> str:
        """The parameter marker of the driver's paramstyle, for one parameter."""
        module = sys.modules.get(type(conn).__module__.partition(".")[0])
        style = getattr(module, "paramstyle", "qmark")
        return {"qmark": "?", "numeric": ":1", "named": ":p1"}.get(style, "%s")

    def ago(self, conn: Any, seconds: float) -> tuple[str, Any]:
        """A SQL expression for "``seconds`` ago" with one parameter, and the
        parameter (used to prune the request-id ledger). Standard SQL here."""
        return f"CURRENT_TIMESTAMP - {self.placeholder(conn)} * INTERVAL '1 second'", str(float(seconds))

    def classify_one(self, exc: BaseException) -> tuple[str, str] | None:
        """Classify one exception of this driver (not its chain).

        Returns ``(category_name, reason)`` or None when this driver has
        nothing to say about it; the chain walk in :mod:`poolkit.classify`
        combines the findings."""
        return classify_generic(exc)

    def __repr__(self) -> str:
        return f"<poolkit driver {self.name}>"


def execute_each(conn: Any, statements: list[str]) -> None:
    """Run ``statements`` in order on one cursor of ``conn`` (none opened
    for no statement)."""
    if not statements:
        return
    cur = conn.cursor()
    try:
        for sql in statements:
            cur.execute(sql)
    finally:
        cur.close()


def classify_generic(exc: BaseException) -> tuple[str, str] | None:
    """Rules that hold for any driver: the OS's network errors, EOF, and
    disconnect messages on PEP 249 errors."""
    if isinstance(exc, EOFError):
        return ("BAD_CONNECTION", "eof")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return ("BAD_CONNECTION", "network")
    if isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS:
        return ("BAD_CONNECTION", "network")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OperationalError" in names or "InterfaceError" in names:
        text = str(exc).lower()
        if any(p in text for p in DISCONNECT_PHRASES):
            return ("BAD_CONNECTION", "network")
        if "database is locked" in text or "database is busy" in text:
            return ("RETRYABLE", "busy")
        if "deadlock" in text:
            return ("RETRYABLE", "deadlock")
    if "IntegrityError" in names:
        return ("PERMANENT", "integrity")
    if "ProgrammingError" in names:
        return ("PERMANENT", "programming")
    return None


class DelegatingDriver(Driver):
    """For connections that wrap another driver's connection (SQLAlchemy's
    connection records, poolkit.testing's faulty connections): every question
    goes to the driver of the inner connection. Subclasses say how to
    ``unwrap`` one; an inner connection of None means it is gone."""

    name = "delegating"

    def unwrap(self, conn: Any) -> Any:
        raise NotImplementedError

    def _inner(self, conn: Any) -> tuple[Any, Driver]:
        from poolkit.drivers import driver_for_connection

        raw = self.unwrap(conn)
        return raw, driver_for_connection(raw)

    def socket_fd(self, conn: Any) -> int | None:
        if self.unwrap(conn) is None:
            return None
        raw, d = self._inner(conn)
        return d.socket_fd(raw)

    def cut_fd(self, conn: Any) -> int | None:
        if self.unwrap(conn) is None:
            return None
        raw, d = self._inner(conn)
        return d.cut_fd(raw)

    def alive(self, conn: Any) -> bool:
        if self.unwrap(conn) is None:
            return False
        raw, d = self._inner(conn)
        fd = d.socket_fd(raw)
        if fd is not None:  # poll the inner socket here: the pool sees no fd of ours
            return not _PollProbe(fd).poll(0)  # one look: poll() needs no descriptor of its own
        return d.alive(raw)

    def open(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.open(raw)

    def embedded(self, conn: Any) -> bool:
        if self.unwrap(conn) is None:
            return False
        raw, d = self._inner(conn)
        return d.embedded(raw)

    def transaction_state(self, conn: Any) -> int:
        if self.unwrap(conn) is None:
            return BROKEN
        raw, d = self._inner(conn)
        return d.transaction_state(raw)

    def rollback(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.rollback(raw)

    def commit(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.commit(raw)

    def no_reconnect(self, conn: Any) -> dict[str, Any]:
        raw, d = self._inner(conn)
        return d.no_reconnect(raw)

    def read_only_by_caller(self, conn: Any) -> bool:
        if self.unwrap(conn) is None:
            return False
        raw, d = self._inner(conn)
        return d.read_only_by_caller(raw)

    def commits_first(self, conn: Any, name: str) -> bool:
        raw, d = self._inner(conn)
        return d.commits_first(raw, name)

    def reconnects(self, conn: Any, name: str) -> bool:
        raw, d = self._inner(conn)
        return d.reconnects(raw, name)

    def keeps_transaction_open(self, conn: Any) -> bool:
        raw, d = self._inner(conn)
        return d.keeps_transaction_open(raw)

    def setting_is_method(self, conn: Any, name: str) -> bool:
        raw, d = self._inner(conn)
        return d.setting_is_method(raw, name)

    def get_setting(self, conn: Any, name: str) -> Any:
        raw, d = self._inner(conn)
        return d.get_setting(raw, name)

    def set_setting(self, conn: Any, name: str, value: Any) -> None:
        raw, d = self._inner(conn)
        d.set_setting(raw, name, value)

    def ping(self, conn: Any, timeout: float) -> None:
        raw, d = self._inner(conn)
        d.ping(raw, timeout)

    def reset_session(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.reset_session(raw)

    def resets_session(self, conn: Any) -> bool:
        raw, d = self._inner(conn)
        return d.resets_session(raw)

    def is_broken(self, conn: Any) -> bool:
        if self.unwrap(conn) is None:
            return True
        raw, d = self._inner(conn)
        return d.is_broken(raw)

    def check_interface(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.check_interface(raw)

    def check_config(self, conn: Any) -> None:
        raw, d = self._inner(conn)
        d.check_config(raw)

    def advice(self, conn: Any) -> str | None:
        raw, d = self._inner(conn)
        return d.advice(raw)

    def placeholder(self, conn: Any) -> str:
        raw, d = self._inner(conn)
        return d.placeholder(raw)

    def ago(self, conn: Any, seconds: float) -> tuple[str, Any]:
        raw, d = self._inner(conn)
        return d.ago(raw, seconds)


class _AliveProbe:
    """The liveness probe for a driver whose connections have no socket to
    poll but can tell cheaply whether they are alive (``Driver.alive``).
    Quacks like the socket probe: ``poll(0, 1)`` is truthy when suspect."""

    __slots__ = ("alive", "raw")

    def __init__(self, alive: Callable[[Any], bool], raw: Any) -> None:
        self.alive = alive
        self.raw = raw

    def poll(self, timeout: float, maxevents: int = -1) -> bool:
        return not self.alive(self.raw)

    def close(self) -> None:
        pass


def liveness_probe(driver: Driver, conn: Any) -> Any:
    """The probe the pool runs before reusing ``conn``, costing no round trip:
    ``poll(0, 1)`` is truthy when the connection is suspect (its socket is
    readable or hung up, or the driver says it is not alive) and ``close()``
    frees it. None when the driver has neither a socket nor an ``alive``."""
    fd = driver.socket_fd(conn)
    if fd is not None:
        return socket_probe(fd)
    if type(driver).alive is not Driver.alive:
        return _AliveProbe(driver.alive, conn)
    return None
