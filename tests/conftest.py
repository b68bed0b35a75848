from __future__ import annotations

import os
import sys
import threading
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fakedb  # noqa: E402

from poolkit import Pool  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


def need_server(what: str, exc: BaseException | None = None) -> None:
    """A server the test needs is not there: skip locally, fail under CI."""
    msg = f"{what} is not reachable" + (f": {exc!r}" if exc else "")
    if IN_CI:
        pytest.fail(msg + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(msg)


class Clock:
    """An injected clock that tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


@pytest.fixture
def server() -> fakedb.Server:
    return fakedb.Server()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_pool(server: fakedb.Server, clock: Clock) -> Any:
    pools: list[Pool] = []

    def make(**kw: Any) -> Pool:
        kw.setdefault("clock", clock)
        kw.setdefault("maintenance_interval", 3600.0)  # tests call _maintain() themselves
        pool = Pool(server.connect, **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close(timeout=1.0)
