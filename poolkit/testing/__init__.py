"""Fault injection and real clusters for tests, yours and poolkit's.

- :mod:`poolkit.testing.dqlite`: a real N-node dqlite cluster of
  ``dqlite-demo`` processes on loopback ports, with kill / pause / resume /
  restart of any node.
"""
