"""Fault injection for tests, yours and poolkit's own.

- :class:`Faulty`: wrap any DB-API connect callable or module and inject, at
  a chosen point (connect, execute, fetch, commit, rollback, close, the
  liveness probe), a delay, an exception, a hang or a pause that the test
  releases; by count or probability, with a seed.
- :class:`ChaosProxy`: a TCP proxy on loopback between a pool and a real
  server, with latency and jitter, reset of every connection, refused
  connections, a blackhole, a slow close and a cut reply.
- :mod:`poolkit.testing.dqlite`: a real N-node dqlite cluster (imported on
  its own: ``from poolkit.testing.dqlite import DqliteCluster``).
"""

from poolkit.testing.faults import (
    POINTS,
    Delay,
    Fault,
    Faulty,
    FaultyConnection,
    Hang,
    Pause,
    Raise,
    broken_pipe,
    eof,
    reset,
)
from poolkit.testing.proxy import ChaosProxy

__all__ = [
    "POINTS",
    "ChaosProxy",
    "Delay",
    "Fault",
    "Faulty",
    "FaultyConnection",
    "Hang",
    "Pause",
    "Raise",
    "broken_pipe",
    "eof",
    "reset",
]
