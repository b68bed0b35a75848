"""The pool's own exceptions.

Driver exceptions are never replaced by these: they reach the caller as the
driver raised them, except when the outcome of a commit is unknown, which is
reported as :class:`AmbiguousCommitError` raised *from* the driver's error.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousCommitError",
    "ConnectionReturned",
    "ManagedTransactionError",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "TooManyWaiters",
]


class PoolError(Exception):
    """Base class of every exception raised by poolkit itself."""


class PoolTimeout(PoolError, TimeoutError):
    """No connection could be had within the timeout.

    When connecting was what failed, the last connect error is the
    ``__cause__``.
    """


class PoolClosed(PoolError):
    """The pool was closed (before or while the caller waited)."""


class TooManyWaiters(PoolError):
    """The wait queue is full (``max_waiting``); the request was refused at once."""


class ConnectionReturned(PoolError):
    """A pooled connection was used after it was returned to its pool."""


class ManagedTransactionError(PoolError):
    """The work of ``pool.run`` (or the body of ``with pool.transaction()``)
    tried to end the transaction that the pool runs it in: ``commit()``,
    ``rollback()``, or a change of ``autocommit`` or ``isolation_level``.

    The pool commits when the work returns and rolls back when it raises. A
    commit of the work's own would let a retry run the committed part again,
    or record a request id with half the work. Nothing was sent.
    """


class AmbiguousCommitError(PoolError):
    """The outcome of a commit is unknown: it may or may not have been applied.

    Raised from the driver's exception. poolkit never retries such work
    unless the caller said it is idempotent or gave a request id.
    """


for _cls in (
    PoolError,
    PoolTimeout,
    PoolClosed,
    TooManyWaiters,
    ConnectionReturned,
    ManagedTransactionError,
    AmbiguousCommitError,
):
    _cls.__module__ = "poolkit"
del _cls
