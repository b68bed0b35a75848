"""A soak of poolkit's write promises under network chaos, on a real server.

    python -m benchmarks.soak --backend postgresql|mariadb [--dsn DSN]
        [--seconds 30] [--workers 8] [--request-ids] [--seed 1]

Workers insert one row per call with ``pool.run``, each row named after its
call, through a ``poolkit.testing.ChaosProxy`` that every so often resets
every connection, cuts the reply to a COMMIT after the server has it, or
adds latency. At the end each call's outcome is checked against what the
table holds:

- a call that returned wrote its row exactly once;
- a call that raised anything but ``AmbiguousCommitError`` wrote nothing;
- no row was written twice;
- with ``--request-ids``, each call is made again with its id until it
  returns (as a client that retries would), and every row is there once.

It prints the outcomes and exits 1 if any promise was broken. It is not a
speed figure: the chaos dominates the time.
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import poolkit
from poolkit.testing import ChaosProxy

_TABLE = "poolkit_soak"
_LEDGER = "poolkit_soak_ledger"


def _setup(backend: str, dsn: str | None) -> tuple[Any, tuple[str, int], Callable[[int], Any]]:
    """The admin connection, the server's address, and a connect through a
    proxy listening on a given port."""
    from benchmarks.backends import DEFAULT_MYSQL, DEFAULT_PG_DSN, _mysql_args

    if backend == "postgresql":
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        dsn = dsn or DEFAULT_PG_DSN
        info = conninfo_to_dict(dsn)
        admin = psycopg.connect(dsn, autocommit=True)
        admin.execute(f"DROP TABLE IF EXISTS {_TABLE}")
        admin.execute(f"CREATE TABLE {_TABLE} (n SERIAL PRIMARY KEY, tag VARCHAR(40) NOT NULL)")

        def pg_connect(port: int) -> Any:
            return psycopg.connect(make_conninfo(dsn, host="127.0.0.1", port=port, connect_timeout=2))

        return admin, (str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432))), pg_connect
    if backend == "mariadb":
        import pymysql

        args = _mysql_args(dsn or DEFAULT_MYSQL)
        admin = pymysql.connect(**args, autocommit=True)
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {_TABLE}")
            cur.execute(f"CREATE TABLE {_TABLE} (n INT AUTO_INCREMENT PRIMARY KEY, tag VARCHAR(40) NOT NULL)")

        def my_connect(port: int) -> Any:
            return pymysql.connect(
                **{**args, "host": "127.0.0.1", "port": port}, connect_timeout=2, read_timeout=5, write_timeout=5
            )

        return admin, (str(args.get("host", "127.0.0.1")), int(args.get("port", 3306))), my_connect
    raise SystemExit(f"benchmarks.soak: backend must be postgresql or mariadb, not {backend!r}")


def _rows(backend: str, admin: Any) -> dict[str, int]:
    sql = f"SELECT tag, count(*) FROM {_TABLE} GROUP BY tag"
    if backend == "postgresql":
        return {c: int(n) for c, n in admin.execute(sql).fetchall()}
    with admin.cursor() as cur:
        cur.execute(sql)
        return {c: int(n) for c, n in cur.fetchall()}


def _drop(backend: str, admin: Any) -> None:
    for table in (_TABLE, _LEDGER):
        if backend == "postgresql":
            admin.execute(f"DROP TABLE IF EXISTS {table}")
        else:
            with admin.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {table}")


def _chaos(proxy: ChaosProxy, stop: threading.Event, seed: int) -> None:
    r = random.Random(seed)
    while not stop.wait(r.uniform(0.05, 0.3)):
        k = r.random()
        if k < 0.4:
            proxy.reset_all()  # a server restart, a proxy that drops everything
        elif k < 0.7:
            proxy.cut_reply_after(b"COMMIT")  # the commit lands; its reply never comes
        else:
            proxy.latency(0.002, jitter=0.004)
            stop.wait(0.2)
            proxy.latency(0.0)


def soak(backend: str, dsn: str | None, seconds: float, workers: int, request_ids: bool, seed: int) -> int:
    # the pool's warnings (a discarded connection, a retry) come by the
    # hundred here: unless logging is set up, they go nowhere
    logging.getLogger("poolkit").addHandler(logging.NullHandler())
    admin, target, connect = _setup(backend, dsn)
    outcomes: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    try:
        with ChaosProxy(*target) as proxy:
            pool = poolkit.Pool(
                lambda: connect(proxy.port),
                max_size=max(2, workers - 2),
                timeout=10,
                ping_timeout=1,
                ledger_table=_LEDGER,
                retry=poolkit.Retry(attempts=8, initial_backoff=0.01),
                name="soak",
            )

            def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    call = f"w{w}-{i}"

                    def work(conn: Any, call: str = call) -> None:
                        conn.cursor().execute(f"INSERT INTO {_TABLE} (tag) VALUES (%s)", (call,))

                    outcome = "error"
                    for _ in range(20 if request_ids else 1):
                        try:
                            pool.run(work, request_id=call if request_ids else None)
                            outcome = "returned"
                            break
                        except poolkit.AmbiguousCommitError:
                            outcome = "ambiguous"
                        except Exception:
                            outcome = "error"
                        time.sleep(0.05)  # then call again with the same id
                    with lock:
                        outcomes[call] = outcome

            threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
            threads.append(threading.Thread(target=_chaos, args=(proxy, stop, seed), daemon=True))
            for t in threads:
                t.start()
            stop.wait(seconds)
            stop.set()
            for t in threads:
                t.join(60)
            stats = pool.stats()
            pool.close()
        rows = _rows(backend, admin)
    finally:
        _drop(backend, admin)
        admin.close()

    counted = collections.Counter(outcomes.values())
    twice = sorted(c for c, n in rows.items() if n > 1)
    lost = sorted(c for c, o in outcomes.items() if o == "returned" and rows.get(c, 0) != 1)
    leaked = sorted(c for c, o in outcomes.items() if o == "error" and rows.get(c, 0) != 0)
    ambiguous = collections.Counter(rows.get(c, 0) for c, o in outcomes.items() if o == "ambiguous")
    unfinished = sorted(c for c, o in outcomes.items() if o != "returned") if request_ids else []
    print(
        f"soak on {backend}, {seconds:g} s, {workers} workers, "
        f"{'request ids' if request_ids else 'no request ids'}: {len(outcomes)} calls "
        f"({counted['returned']} returned, {counted['error']} raised, {counted['ambiguous']} ambiguous); "
        f"{stats.closed_bad} connections discarded, {stats.retries} retries"
    )
    if counted["ambiguous"]:
        print(f"  ambiguous calls: {ambiguous[1]} had committed, {ambiguous[0]} had not")
    broken = [
        ("rows written twice", twice),
        ("calls that returned with no row", lost),
        ("calls that raised, with a row committed", leaked),
        ("calls with an id that never returned", unfinished),
    ]
    for what, calls in broken:
        print(f"  {what}: {len(calls)}" + (f" (e.g. {', '.join(calls[:5])})" if calls else ""))
    return 1 if any(calls for _, calls in broken) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True, choices=["postgresql", "mariadb"])
    ap.add_argument("--dsn", help="the server's DSN (default: this machine's)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the workers run (default 30)")
    ap.add_argument("--workers", type=int, default=8, help="threads calling pool.run (default 8)")
    ap.add_argument(
        "--request-ids", action="store_true", help="give each call a request id, and call again until it returns"
    )
    ap.add_argument("--seed", type=int, default=1, help="the chaos's random seed")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    return soak(args.backend, args.dsn, args.seconds, args.workers, args.request_ids, args.seed)


if __name__ == "__main__":
    sys.exit(main())
