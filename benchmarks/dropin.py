"""What a connect, ``SELECT 1`` and close cost through the DB-API drop-in.

    python -m benchmarks.dropin [--backend postgresql|mariadb] [--dsn DSN] [--rounds 7] [-n 300]

The drop-in resets each session it takes back (``reset_session=True``, its
default for psycopg and PyMySQL), when the caller closes it
(``reset_on="return"``, its default too). This measures that against a
reset before the next checkout, no reset at all, and the driver's own
connect, each variant in turn within a round (interleaved: these machines'
speed changes within a second; in a new order each round), and prints the
median and range over the rounds of the time per connect + ``SELECT 1`` +
close, in µs.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.backends import DEFAULT_MYSQL, DEFAULT_PG_DSN, _mysql_args


def variants(backend: str, dsn: str | None) -> tuple[dict[str, Callable[[], Any]], list[Any]]:
    """Each variant's connect, by name (it returns a connection to run
    ``SELECT 1`` on and close), and the drop-in modules to close after."""
    import poolkit.dbapi

    if backend == "postgresql":
        import psycopg

        driver: Any = psycopg
        args: tuple[Any, ...] = (dsn or DEFAULT_PG_DSN,)
        kwargs: dict[str, Any] = {}
    else:
        import pymysql

        driver = pymysql
        args, kwargs = (), _mysql_args(dsn or DEFAULT_MYSQL)
    modules = {
        "drop-in, reset at return": poolkit.dbapi.wrap(driver),
        "drop-in, reset at checkout": poolkit.dbapi.wrap(driver, reset_on="checkout"),
        "drop-in, no reset": poolkit.dbapi.wrap(driver, reset_session=False),
        "driver's own connect": driver,
    }
    connects: dict[str, Callable[[], Any]] = {
        name: functools.partial(m.connect, *args, **kwargs) for name, m in modules.items()
    }
    return connects, [m for m in modules.values() if m is not driver]


def once(connect: Callable[[], Any]) -> None:
    conn = connect()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.close()
    conn.close()


def measure(connects: dict[str, Callable[[], Any]], rounds: int, n: int) -> dict[str, list[float]]:
    """µs per cycle, a figure per round for each variant."""
    for connect in connects.values():
        once(connect)  # warm: the drop-in's pool opens its connection
    results: dict[str, list[float]] = {name: [] for name in connects}
    for r in range(rounds):
        # in a new order each round (the same from run to run): whichever
        # follows the driver's own connects (hundreds of sessions just closed
        # on the server) pays for them, and in a fixed order, or a rotation
        # of one, that is always the same variant
        names = list(connects)
        random.Random(r).shuffle(names)
        for name in names:
            connect = connects[name]
            start = time.perf_counter()
            for _ in range(n):
                once(connect)
            results[name].append((time.perf_counter() - start) / n * 1e6)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dropin", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="postgresql", choices=["postgresql", "mariadb"])
    ap.add_argument("--dsn", help="the target (default: the runner's for this machine)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-n", type=int, default=300, help="cycles per variant per round")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n < 1:
        ap.error("--rounds and -n must be at least 1")
    connects, pooled = variants(args.backend, args.dsn)
    try:
        results = measure(connects, args.rounds, args.n)
    finally:
        for m in pooled:
            m.close_all()
    print(
        f"connect + SELECT 1 + close ({args.backend}, Python {sys.version.split()[0]}; "
        f"medians of {args.rounds} interleaved rounds of {args.n}, µs)"
    )
    for name, figures in results.items():
        print(f"{name:28s} {statistics.median(figures):8.0f}  [{min(figures):.0f}..{max(figures):.0f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
