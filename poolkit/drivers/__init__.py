"""What poolkit knows about each DB-API driver.

A :class:`Driver` answers the questions the pool asks about a raw
connection: which socket to probe for liveness, what the transaction state
is, how to ping with a timeout, how to reset the session, and what a driver
exception means. One module per driver (``sqlite3``, ``psycopg``,
``pymysql``, ``dqlite``), imported lazily the first time a connection or
exception of that driver is seen; :class:`Driver` itself is the fallback for
any other PEP 249 driver.

Users add a driver, or override a built-in one, with :func:`register_driver`.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from poolkit.drivers._base import (
    BROKEN,
    IDLE,
    IN_TRANSACTION,
    ISOLATION_LEVELS,
    UNKNOWN,
    DelegatingDriver,
    Driver,
    liveness_probe,
)

__all__ = [
    "BROKEN",
    "IDLE",
    "IN_TRANSACTION",
    "ISOLATION_LEVELS",
    "UNKNOWN",
    "DelegatingDriver",
    "Driver",
    "driver_for_connection",
    "driver_for_module",
    "liveness_probe",
    "register_driver",
]

# top-level package of the driver -> module of poolkit that supports it
_BUILTIN = {
    "sqlite3": "poolkit.drivers.sqlite3",
    "_sqlite3": "poolkit.drivers.sqlite3",
    "psycopg": "poolkit.drivers.psycopg",
    "pymysql": "poolkit.drivers.pymysql",
    "dqlitedbapi": "poolkit.drivers.dqlite",
    "dqliteclient": "poolkit.drivers.dqlite",
    "dqlitewire": "poolkit.drivers.dqlite",
    "poolkit": "poolkit.testing.faults",  # connections wrapped by poolkit.testing.Faulty
}

_GENERIC = Driver()
_lock = threading.Lock()  # protects _registry
_registry: dict[str, Driver] = {}


def register_driver(package: str, driver: Driver) -> None:
    """Use ``driver`` for connections and exceptions whose type is defined in
    the top-level package ``package`` (e.g. ``"psycopg"``), replacing any
    built-in support for it."""
    if not isinstance(driver, Driver):
        raise TypeError(f"driver must be a poolkit.drivers.Driver, not {type(driver).__name__}")
    if not package or "." in package:
        raise ValueError(f"package must be a top-level package name, got {package!r}")
    with _lock:
        _registry[package] = driver


def driver_for_module(module_name: str) -> Driver:
    """The driver support for objects defined in ``module_name``."""
    top = module_name.partition(".")[0]
    found = _registry.get(top)
    if found is not None:
        return found
    path = _BUILTIN.get(top)
    if path is None:
        return _GENERIC
    driver: Driver = importlib.import_module(path).DRIVER
    with _lock:
        return _registry.setdefault(top, driver)


def driver_for_connection(conn: Any) -> Driver:
    """The driver support for a raw DB-API connection."""
    return driver_for_module(type(conn).__module__)
