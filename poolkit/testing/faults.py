"""A faulty driver: wrap any DB-API connect callable (or module) and inject
faults at chosen points, so your tests meet broken connections on purpose.

    from poolkit.testing import Faulty, Delay, Raise, Hang, eof

    faulty = Faulty(functools.partial(psycopg.connect, dsn))
    faulty.inject("commit", Raise(eof), count=1)          # the next COMMIT dies with EOF
    faulty.inject("execute", Delay(0.005, jitter=0.005))    # every statement slows down
    faulty.inject("probe", Raise(eof), probability=0.1, seed=7)   # the liveness probe sees a dead socket
    pause = faulty.pause_at("commit")                      # stop a thread right there...
    pause.wait_reached(); ...; pause.release()             # ...and let it go from the test
    pool = poolkit.Pool(faulty.connect)

Points: ``connect``, ``execute`` (and ``executemany``), ``fetch``,
``commit``, ``rollback``, ``close``, ``probe`` (what poolkit's liveness
probe sees: a ``Raise`` there makes the connection look dead). A fault
fires ``count`` times (None: always), each time with ``probability``,
drawn from a ``random.Random(seed)`` so that a run can be replayed.

The wrapped connections still look like the driver's to poolkit: probe,
transaction state, ping and classification go to the real driver.
"""

from __future__ import annotations

import random
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from poolkit.drivers import DelegatingDriver

__all__ = [
    "POINTS",
    "Delay",
    "Fault",
    "Faulty",
    "FaultyConnection",
    "FaultyCursor",
    "Hang",
    "Pause",
    "Raise",
    "broken_pipe",
    "eof",
    "reset",
]

POINTS = ("connect", "execute", "fetch", "commit", "rollback", "close", "probe")


def eof() -> BaseException:
    return EOFError("injected: end of file on the connection")


def reset() -> BaseException:
    return ConnectionResetError(104, "injected: connection reset by peer")


def broken_pipe() -> BaseException:
    return BrokenPipeError(32, "injected: broken pipe")


class Fault:
    """What happens at an injection point. Subclasses implement ``fire``."""

    def fire(self, point: str) -> None:
        raise NotImplementedError


class Delay(Fault):
    """Sleep ``seconds`` (plus up to ``jitter`` more) before the operation."""

    def __init__(self, seconds: float, jitter: float = 0.0) -> None:
        if seconds < 0 or jitter < 0:
            raise ValueError("Delay takes seconds >= 0 and jitter >= 0")
        self.seconds = seconds
        self.jitter = jitter
        self._random = random.Random()

    def fire(self, point: str) -> None:
        time.sleep(self.seconds + (self._random.random() * self.jitter if self.jitter else 0.0))


class Raise(Fault):
    """Raise an exception instead of doing the operation. ``error`` is an
    exception instance, an exception class, or a zero-argument factory (so
    each firing raises a fresh one), e.g. ``Raise(eof)`` or
    ``Raise(lambda: psycopg.OperationalError("..."))``."""

    def __init__(self, error: BaseException | type[BaseException] | Callable[[], BaseException]) -> None:
        self.error = error

    def fire(self, point: str) -> None:
        e = self.error
        if isinstance(e, BaseException):
            raise e
        raise e()


class Pause(Fault):
    """Block the thread that reaches the point until the test releases it.
    ``wait_reached()`` returns once a thread is blocked there."""

    def __init__(self, timeout: float | None = 30.0) -> None:
        self.timeout = timeout
        self.reached = threading.Event()
        self._released = threading.Event()

    def fire(self, point: str) -> None:
        self.reached.set()
        if not self._released.wait(self.timeout):
            raise TimeoutError(f"injected pause at {point!r} was never released")

    def wait_reached(self, timeout: float = 10.0) -> None:
        if not self.reached.wait(timeout):
            raise TimeoutError("no thread reached the pause point")

    def release(self) -> None:
        self._released.set()


class Hang(Pause):
    """Block until released (``release()``), as a server that never answers;
    then raise ``error`` (a timeout by default) unless ``error`` is None."""

    def __init__(self, timeout: float | None = None, error: Callable[[], BaseException] | None = None) -> None:
        super().__init__(timeout)
        self.error = error if error is not None else (lambda: TimeoutError("injected: no answer"))

    def fire(self, point: str) -> None:
        self.reached.set()
        self._released.wait(self.timeout)
        if self.error is not None:
            raise self.error()


class _Rule:
    __slots__ = ("count", "fault", "probability")

    def __init__(self, fault: Fault, count: int | None, probability: float) -> None:
        self.fault = fault
        self.count = count
        self.probability = probability


class Faulty:
    """Wraps a connect callable (or a DB-API module: its ``connect``)."""

    def __init__(self, target: Callable[..., Any] | types.ModuleType, *args: Any, **kwargs: Any) -> None:
        connect = target.connect if isinstance(target, types.ModuleType) else target
        if not callable(connect):
            raise TypeError(f"Faulty wraps a connect callable or a DB-API module, not {target!r}")
        self._connect = connect
        self._args = args
        self._kwargs = kwargs
        self._lock = threading.Lock()  # protects _rules, _random, fired
        self._rules: dict[str, list[_Rule]] = {p: [] for p in POINTS}
        self._random = random.Random()
        #: how many times a fault fired, per point
        self.fired: dict[str, int] = dict.fromkeys(POINTS, 0)

    def inject(
        self,
        point: str,
        fault: Fault,
        *,
        count: int | None = None,
        probability: float = 1.0,
        seed: int | None = None,
    ) -> Faulty:
        if point not in POINTS:
            raise ValueError(f"unknown injection point {point!r}; choose from {', '.join(POINTS)}")
        if not isinstance(fault, Fault):
            raise TypeError(f"fault must be a poolkit.testing.Fault (Delay, Raise, Hang, Pause), not {fault!r}")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 or None")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        with self._lock:
            if seed is not None:
                self._random.seed(seed)
            self._rules[point].append(_Rule(fault, count, probability))
        return self

    def pause_at(self, point: str, *, count: int = 1, timeout: float | None = 30.0) -> Pause:
        """Block the next thread(s) that reach ``point`` until released."""
        pause = Pause(timeout)
        self.inject(point, pause, count=count)
        return pause

    def clear(self, point: str | None = None) -> None:
        with self._lock:
            for p in [point] if point else list(POINTS):
                self._rules[p] = []

    def _trip(self, point: str) -> None:
        rules = self._rules[point]
        if not rules:
            return
        due: list[Fault] = []
        with self._lock:
            for rule in list(rules):
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        rules.remove(rule)
                self.fired[point] += 1
                due.append(rule.fault)
        for fault in due:  # outside the lock: a fault may block
            fault.fire(point)

    def _probe_dead(self) -> bool:
        try:
            self._trip("probe")
        except BaseException:
            return True
        return False

    def connect(self, *args: Any, **kwargs: Any) -> FaultyConnection:
        self._trip("connect")
        raw = self._connect(*(args or self._args), **(kwargs or self._kwargs))
        return FaultyConnection(raw, self)

    __call__ = connect


class FaultyConnection:
    """A driver connection with faults at its points; everything else is the
    driver's (attributes are forwarded)."""

    def __init__(self, raw: Any, faulty: Faulty) -> None:
        object.__setattr__(self, "_faulty_inner", raw)
        object.__setattr__(self, "_faulty", faulty)

    def cursor(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        return FaultyCursor(self._faulty_inner.cursor(*args, **kwargs), self._faulty)

    def execute(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        self._faulty._trip("execute")
        return FaultyCursor(self._faulty_inner.execute(*args, **kwargs), self._faulty)

    def commit(self) -> None:
        self._faulty._trip("commit")
        self._faulty_inner.commit()

    def rollback(self) -> None:
        self._faulty._trip("rollback")
        self._faulty_inner.rollback()

    def close(self) -> None:
        self._faulty._trip("close")
        self._faulty_inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._faulty_inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._faulty_inner, name, value)

    def __enter__(self) -> FaultyConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultyConnection around {self._faulty_inner!r}>"


class FaultyCursor:
    def __init__(self, cursor: Any, faulty: Faulty) -> None:
        object.__setattr__(self, "_faulty_inner", cursor)
        object.__setattr__(self, "_faulty", faulty)

    def execute(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        self._faulty._trip("execute")
        self._faulty_inner.execute(*args, **kwargs)
        return self

    def executemany(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        self._faulty._trip("execute")
        self._faulty_inner.executemany(*args, **kwargs)
        return self

    def fetchone(self) -> Any:
        self._faulty._trip("fetch")
        return self._faulty_inner.fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        self._faulty._trip("fetch")
        return self._faulty_inner.fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        self._faulty._trip("fetch")
        return self._faulty_inner.fetchall()

    def __iter__(self) -> Any:
        return iter(self.fetchall())

    def close(self) -> None:
        self._faulty_inner.close()

    def __enter__(self) -> FaultyCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._faulty_inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._faulty_inner, name, value)


class FaultyDriver(DelegatingDriver):
    """poolkit's view of a wrapped connection: the real driver's answers,
    with the ``probe`` point in front of the liveness probe and the
    ``rollback`` point in front of the pool's rollback."""

    name = "faulty"

    def unwrap(self, conn: Any) -> Any:
        return conn._faulty_inner

    def socket_fd(self, conn: Any) -> int | None:
        return None  # the probe goes through alive(), so that "probe" faults apply

    def cut_fd(self, conn: Any) -> int | None:
        return super().socket_fd(conn)  # the real socket: a wait on it is cut as without faults

    def alive(self, conn: Any) -> bool:
        return not conn._faulty._probe_dead() and super().alive(conn)

    def rollback(self, conn: Any) -> None:
        conn.rollback()  # through the "rollback" point

    def begin(self, conn: Any, isolation_level: str | None = None) -> None:
        target = getattr(conn, "driver_connection", conn)  # pool.run passes its proxy
        _, d = self._inner(target)
        if isolation_level is None:
            d.begin(conn)
        else:
            d.begin(conn, isolation_level)


DRIVER = FaultyDriver()
