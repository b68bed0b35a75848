"""Turn any driver exception into a decision.

:func:`classify` walks the whole exception chain (``__cause__``,
``__context__``, the members of exception groups; cycles are cut) and asks
the driver that defined each exception what it means. The findings are
combined so that the most cautious one wins: an outcome that may have
happened (``AMBIGUOUS``) over a dead connection (``BAD_CONNECTION``) over a
rejected write (``NOT_LEADER``) over a transient conflict (``RETRYABLE``).
An exception nobody recognises is ``PERMANENT``: what is not understood is
never retried.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poolkit.drivers import Driver, driver_for_module
from poolkit.errors import AmbiguousCommitError, PoolError

__all__ = ["Category", "Classification", "Classifier", "classify"]


class Category(enum.Enum):
    """What to do about an error. See the table in the README."""

    #: the connection is unusable; the statement may or may not have run
    BAD_CONNECTION = "bad_connection"
    #: the node does not take writes; the statement was rejected before it ran
    NOT_LEADER = "not_leader"
    #: the outcome (of a commit) is unknown
    AMBIGUOUS = "ambiguous"
    #: a transient conflict; the connection is fine after a rollback
    RETRYABLE = "retryable"
    #: the request itself is at fault, or the error is not understood
    PERMANENT = "permanent"

    def __repr__(self) -> str:
        return f"Category.{self.name}"


# higher wins when one chain holds several findings
_RANK = {
    Category.PERMANENT: 0,
    Category.RETRYABLE: 1,
    Category.NOT_LEADER: 2,
    Category.BAD_CONNECTION: 3,
    Category.AMBIGUOUS: 4,
}


@dataclass(frozen=True, slots=True)
class Classification:
    category: Category
    #: why, in a word: "eof", "network", "read_only", "serialization", ...
    reason: str
    #: the exception in the chain that decided (None for the unknown default)
    source: BaseException | None = None

    @property
    def discards_connection(self) -> bool:
        return self.category in (Category.BAD_CONNECTION, Category.NOT_LEADER, Category.AMBIGUOUS)


#: a pool's own classifier: consulted first; None defers to the built-in rules
Classifier = Callable[[BaseException], "Classification | None"]

# exception groups exist from Python 3.11 on
_GROUP: type | tuple[()] = getattr(builtins, "BaseExceptionGroup", ())

_UNKNOWN = Classification(Category.PERMANENT, "unknown")
MAX_CHAIN = 64  # exceptions looked at in one chain, at most


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception reachable from ``exc``, each once, outermost first."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack = [exc]
    while stack and len(out) < MAX_CHAIN:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        if _GROUP and isinstance(e, _GROUP):
            stack.extend(reversed(e.exceptions))  # type: ignore[attr-defined]
        if e.__context__ is not None:
            stack.append(e.__context__)
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    return out


def remember(exc: BaseException, c: Classification) -> None:
    """Keep ``c``, made with the connection ``exc`` came from at hand, on
    ``exc`` for :func:`remembered`: a retry decides after the connection is
    gone, and some things only the connection can tell (read-only by the
    caller's choice, broken)."""
    with contextlib.suppress(Exception):  # an exception that takes no attribute
        exc._poolkit_classified = c  # type: ignore[attr-defined]


def remembered(exc: BaseException) -> Classification | None:
    """What :func:`remember` kept for ``exc``, its cause, or the DBAPI error
    inside it (SQLAlchemy's ``orig``), if anything."""
    for x in (exc, getattr(exc, "orig", None), exc.__cause__):
        c = getattr(x, "_poolkit_classified", None)
        if isinstance(c, Classification):
            return c
    return None


def _classify_one(exc: BaseException) -> tuple[str, str] | None:
    if isinstance(exc, AmbiguousCommitError):
        return ("AMBIGUOUS", "commit_unknown")
    if isinstance(exc, PoolError):
        return None  # the pool's own errors say nothing about a connection
    return driver_for_module(type(exc).__module__).classify_one(exc)


def classify(
    exc: BaseException,
    *,
    during_commit: bool = False,
    connection: Any = None,
    driver: Driver | None = None,
) -> Classification:
    """Classify ``exc`` and its whole chain.

    ``during_commit``: the error came from COMMIT, so a lost connection
    means the outcome is unknown (``AMBIGUOUS``). ``connection``: the raw
    connection the error came from; one that reports itself broken makes an
    otherwise unknown error ``BAD_CONNECTION``, and a write refused as
    read-only on a connection the caller made read-only (psycopg's
    ``read_only``) is ``PERMANENT``, not ``NOT_LEADER``.
    """
    best: Classification | None = None
    for e in _chain(exc):
        found = _classify_one(e)
        if found is None:
            continue
        c = Classification(Category[found[0]], found[1], e)
        if best is None or _RANK[c.category] > _RANK[best.category]:
            best = c
    if connection is not None:
        d = driver if driver is not None else driver_for_module(type(connection).__module__)
        if best is not None and best.category is Category.NOT_LEADER:
            try:
                mine = d.read_only_by_caller(connection)
            except Exception:
                mine = False
            if mine:  # read-only by the caller's own choice: any node would refuse the write
                best = Classification(Category.PERMANENT, "read_only_by_caller", best.source)
        if best is None or best.category is Category.PERMANENT:
            try:
                broken = d.is_broken(connection)
            except Exception:
                broken = True
            if broken:
                best = Classification(Category.BAD_CONNECTION, "broken", exc)
    if best is None:
        return _UNKNOWN if exc is None else Classification(Category.PERMANENT, "unknown", exc)
    if during_commit and best.category is Category.BAD_CONNECTION:
        return Classification(Category.AMBIGUOUS, best.reason, best.source)
    return best
