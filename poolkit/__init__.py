"""poolkit: a connection pool for DB-API drivers in the style of Go's database/sql.

import functools, psycopg, poolkit

pool = poolkit.Pool(functools.partial(psycopg.connect, "dbname=test"), max_size=10)
with pool.connection() as conn:
    conn.execute("SELECT 1")
pool.run(lambda conn: conn.execute("INSERT ..."), request_id="order-42")
"""

from poolkit.classify import Category, Classification, classify
from poolkit.errors import (
    AmbiguousCommitError,
    ConnectionReturned,
    ManagedTransactionError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
)
from poolkit.failover import Failover, failover
from poolkit.pool import Pool, PooledConnection, PooledCursor
from poolkit.retry import RETRY_ENV, Ledger, Retry
from poolkit.stats import PoolStats

__version__ = "0.1.0"

__all__ = [
    "RETRY_ENV",
    "AmbiguousCommitError",
    "Category",
    "Classification",
    "ConnectionReturned",
    "Failover",
    "Ledger",
    "ManagedTransactionError",
    "Pool",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "PooledConnection",
    "PooledCursor",
    "Retry",
    "TooManyWaiters",
    "classify",
    "failover",
]
