"""The pool's own exceptions.

Driver exceptions are never replaced by these: they reach the caller as the
driver raised them, except when the outcome of a commit is unknown, which is
reported as :class:`AmbiguousCommitError` raised *from* the driver's error.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousCommitError",
    "ConnectionReturned",
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


class AmbiguousCommitError(PoolError):
    """The outcome of a commit is unknown: it may or may not have been applied.

    Raised from the driver's exception. poolkit never retries such work
    unless the caller said it is idempotent or gave a request id.
    """


for _cls in (PoolError, PoolTimeout, PoolClosed, TooManyWaiters, ConnectionReturned, AmbiguousCommitError):
    _cls.__module__ = "poolkit"
del _cls
