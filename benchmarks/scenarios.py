"""The scenarios. Each returns a plain dict of results.

Pools compared in one scenario run in interleaved short bursts, in a new
random order every round: this machine's CPU speed changes by up to 2x
within a second, so back-to-back blocks would mislead. Figures are medians
over the rounds, with their spread; a ratio poolkit / peer is computed
within each round (the two bursts ran seconds apart at most) and the median
of those ratios is reported.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import peers as peers_mod
from benchmarks.backends import Backend
from benchmarks.peers import Counting, Peer


@dataclass
class Settings:
    rounds: int
    burst: int  # operations per burst in single-thread scenarios
    contention_seconds: float
    contention_rounds: int
    failover_seconds: float
    spike_rounds: int
    progress: Callable[[str], None] = field(default=lambda msg: None)


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    """Median with its spread (min, max) over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _open_peers(names: list[str], backend: Backend, size: int, **kw: Any) -> dict[str, Peer]:
    out = {}
    for name in names:
        out[name] = peers_mod.make(name, Counting(backend.connect), size, dsn=backend.dsn, backend=backend.name, **kw)
    return out


def _close(peers: dict[str, Peer]) -> None:
    for p in peers.values():
        try:
            p.close()
        except Exception:
            pass


def _query(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.close()


def _ratios(per_round: dict[str, list[float]], base: str = "poolkit") -> dict[str, dict[str, float]]:
    if base not in per_round:
        return {}
    out = {}
    for name, values in per_round.items():
        if name == base:
            continue
        rs = [b / v for b, v in zip(per_round[base], values, strict=True) if v > 0]
        if rs:
            out[name] = summary(rs)
    return out


# ------------------------------------------------------------- checkout / query


def _single_thread(names: list[str], backend: Backend, s: Settings, with_query: bool, label: str) -> dict[str, Any]:
    peers = _open_peers(names, backend, 4)
    for p in peers.values():
        p.warm()
    clock = time.perf_counter_ns
    p50s: dict[str, list[float]] = {n: [] for n in peers}
    p99s: dict[str, list[float]] = {n: [] for n in peers}
    # The overhead over the raw floor is measured on the very connection the
    # pool hands out: within one checkout, the query runs once through what
    # the pool handed out and once on the driver's own connection (in
    # alternating order), and the overhead is checkout + checkin + the
    # difference of the two queries; a round's figure is the median over its
    # operations. Two different connections cannot be compared: each is served
    # by its own server process, and on this machine the paired difference of
    # two raw connections swings by +-60 us from one burst to the next, as
    # one process or the other is the one the scheduler keeps warm.
    over: dict[str, list[float]] = {n: [] for n in peers} if with_query else {}
    try:
        for r in range(s.rounds):
            order = list(peers)
            random.shuffle(order)
            for name in order:
                p = peers[name]
                co, ci, conn = p.checkout, p.checkin, p.conn
                lat = [0] * s.burst
                for _ in range(min(200, s.burst)):  # warm the code path
                    h = co()
                    if with_query:
                        _query(conn(h))
                    ci(h)
                for i in range(s.burst):
                    t0 = clock()
                    h = co()
                    if with_query:
                        _query(conn(h))
                    ci(h)
                    lat[i] = clock() - t0
                p50s[name].append(pct(lat, 50))
                p99s[name].append(pct(lat, 99))
                if name in over:
                    over[name].append(_overhead_on_same_connection(p, s.burst))
            s.progress(f"{label} round {r + 1}/{s.rounds}")
    finally:
        _close(peers)
    result: dict[str, Any] = {
        "unit": "ns per operation",
        "peers": {n: {"p50": summary(p50s[n]), "p99": summary(p99s[n])} for n in peers},
        "ratio_p50": _ratios(p50s),
    }
    if over:
        result["overhead_over_raw_ns"] = {n: summary(v) for n, v in over.items()}
    return result


def _overhead_on_same_connection(p: Peer, n: int) -> float:
    """Median over ``n`` operations of what ``p`` adds to a SELECT 1 run on
    the driver's connection it hands out (see the comment in _single_thread)."""
    clock = time.perf_counter_ns
    co, ci, conn, driver = p.checkout, p.checkin, p.conn, p.driver_conn
    diffs = [0] * n
    for i in range(n):
        t0 = clock()
        h = co()
        t1 = clock()
        c, d = conn(h), driver(h)
        first, second = (c, d) if i & 1 else (d, c)
        t2 = clock()
        _query(first)
        t3 = clock()
        _query(second)
        t4 = clock()
        through, direct = (t3 - t2, t4 - t3) if i & 1 else (t4 - t3, t3 - t2)
        t5 = clock()
        ci(h)
        diffs[i] = (t1 - t0) + (clock() - t5) + through - direct
    return pct(diffs, 50)


def checkout(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """Checkout + checkin with no query, one thread, a pool of 4."""
    return _single_thread(names, backend, s, with_query=False, label="checkout")


def query(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """Checkout + SELECT 1 + checkin, one thread, a pool of 4."""
    return _single_thread(names, backend, s, with_query=True, label="query")


# ------------------------------------------------------------------ contention


def _contend(p: Peer, threads: int, seconds: float) -> dict[str, Any]:
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    ops = [0] * threads
    waits: list[list[float]] = [[] for _ in range(threads)]
    errors = [0]

    def worker(i: int) -> None:
        co, ci, conn = p.checkout, p.checkin, p.conn
        w = waits[i]
        barrier.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                h = co()
            except Exception:
                errors[0] += 1
                continue
            t1 = time.perf_counter()
            try:
                _query(conn(h))
            finally:
                ci(h)
            if len(w) < 20000:
                w.append(t1 - t0)
            ops[i] += 1

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)
    # Go on until about 100 operations per thread (at most 4x as long): with
    # fewer, a fair pool's least and most served threads differ by chance
    # (16 threads on 4 connections doing 50 units each: 0.8 least/most).
    end = t0 + 4 * seconds
    while sum(ops) < 100 * threads and time.perf_counter() < end:
        stop.wait(0.02)
    stop.set()
    for t in ts:
        t.join(30)
    elapsed = time.perf_counter() - t0
    total = sum(ops)
    fair = total / threads
    allw = [x for w in waits for x in w]
    return {
        "throughput": total / elapsed,
        "ops_per_thread": ops,
        "min_over_max": (min(ops) / max(ops)) if max(ops) else 0.0,
        "starved": sum(1 for o in ops if o < 0.1 * fair),
        "wait_p50_us": pct(allw, 50) * 1e6,
        "wait_p99_us": pct(allw, 99) * 1e6,
        "errors": errors[0],
    }


def contention(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """16 threads on a pool of 4: throughput, waits, fairness."""
    names = [n for n in names if peers_mod.CLASSES[n].multithreaded]
    peers = _open_peers(names, backend, 4)
    for p in peers.values():
        p.warm()
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in peers}
    try:
        for r in range(s.contention_rounds):
            order = list(peers)
            random.shuffle(order)
            for name in order:
                rounds[name].append(_contend(peers[name], 16, s.contention_seconds))
            s.progress(f"contention round {r + 1}/{s.contention_rounds}")
    finally:
        _close(peers)
    out: dict[str, Any] = {"threads": 16, "pool_size": 4, "seconds_per_burst": s.contention_seconds, "peers": {}}
    for name, rs in rounds.items():
        out["peers"][name] = {
            "throughput": summary([x["throughput"] for x in rs]),
            "min_over_max": summary([x["min_over_max"] for x in rs]),
            "starved": summary([float(x["starved"]) for x in rs]),
            "wait_p50_us": summary([x["wait_p50_us"] for x in rs]),
            "wait_p99_us": summary([x["wait_p99_us"] for x in rs]),
            "ops_per_thread_last_round": rs[-1]["ops_per_thread"],
            "errors": sum(x["errors"] for x in rs),
        }
    tp = {n: [x["throughput"] for x in rs] for n, rs in rounds.items()}
    out["ratio_throughput"] = _ratios(tp)
    return out


# -------------------------------------------------------------------- liveness


def liveness(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """What the probe costs against a SELECT 1 round trip, and whether each
    pool hands out a connection the server killed while it was idle."""
    from poolkit.drivers import driver_for_connection, liveness_probe

    raw = backend.connect()
    n = max(1000, s.burst)
    rt = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        _query(raw)
        rt.append(time.perf_counter_ns() - t0)
    out: dict[str, Any] = {"select1_p50_ns": pct(rt, 50)}
    poller = liveness_probe(driver_for_connection(raw), raw)  # the probe poolkit runs
    if poller is not None:
        probe = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            poller.poll(0, 1)
            probe.append(time.perf_counter_ns() - t0)
        poller.close()
        out["probe_p50_ns"] = pct(probe, 50)
    else:
        out["probe_p50_ns"] = None
        out["note"] = "embedded database: no socket, so no probe and no server to kill a connection"
    raw.close()
    s.progress("liveness probe cost")
    if not backend.kills:
        return out
    detection = {}
    for name in names:
        if name in ("raw", "bare"):
            continue
        counting = Counting(backend.connect)
        p = peers_mod.make(name, counting, 4, dsn=backend.dsn, backend=backend.name)
        try:
            p.warm()
            backend.kill(list(counting.opened))
            errors = 0
            for _ in range(4):
                try:
                    h = p.checkout()
                except Exception:
                    errors += 1
                    continue
                try:
                    _query(p.conn(h))
                except Exception:
                    errors += 1
                finally:
                    try:
                        p.checkin(h)
                    except Exception:
                        pass
            detection[name] = {"killed": 4, "errors_reaching_app": errors, "detected": (4 - errors) / 4}
        finally:
            _close({name: p})
        s.progress(f"liveness {name}")
    out["detection"] = detection
    return out


# -------------------------------------------------------------------- failover


def failover(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """A steady workload (4 readers, 1 writer) while the server kills every
    connection of the pool twice a second (dqlite: the leader is killed)."""
    if not backend.kills:
        return {"note": "needs a server that kills connections (postgresql, mariadb)"}
    results = {}
    for name in names:
        if name in ("raw", "bare"):
            continue
        results[name] = _failover_one(name, backend, s)
        s.progress(f"failover {name}")
    return {"seconds": s.failover_seconds, "peers": results}


def _failover_one(name: str, backend: Backend, s: Settings) -> dict[str, Any]:
    table = f"bench_writes_{name}"
    backend.execute(f"DROP TABLE IF EXISTS {table}")
    backend.execute(f"CREATE TABLE {table} (k VARCHAR(64))")
    counting = Counting(backend.connect)
    p = peers_mod.make(name, counting, 4, dsn=backend.dsn, backend=backend.name)
    p.warm()
    pool: Any = getattr(p, "pool", None)
    use_run = name == "poolkit"
    if use_run:
        pool.ledger = type(pool.ledger)(f"bench_ledger_{int(time.time())}")
    stop = threading.Event()
    read_errors = [0]
    write_errors = [0]
    reads_ok: list[float] = []
    acked: list[str] = []
    lock = threading.Lock()
    ph = backend.ph

    def read_once() -> None:
        if use_run:
            pool.run(_query, idempotent=True)
            return
        h = p.checkout()
        try:
            _query(p.conn(h))
        finally:
            p.checkin(h)

    def reader() -> None:
        while not stop.is_set():
            try:
                read_once()
                with lock:
                    reads_ok.append(time.monotonic())
            except Exception:
                with lock:
                    read_errors[0] += 1
                time.sleep(0.005)

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = f"{name}-{i}"
            try:
                if use_run:

                    def ins(conn: Any, key: str = key) -> None:
                        conn.cursor().execute(f"INSERT INTO {table} (k) VALUES ({ph})", (key,))

                    pool.run(ins, request_id=key)
                else:
                    h = p.checkout()
                    try:
                        c = p.conn(h)
                        cur = c.cursor()
                        cur.execute(f"INSERT INTO {table} (k) VALUES ({ph})", (key,))
                        c.commit()
                    finally:
                        p.checkin(h)
                acked.append(key)
            except Exception:
                write_errors[0] += 1
                time.sleep(0.005)

    kills: list[float] = []
    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for t in threads:
        t.start()
    # PostgreSQL / MariaDB: every connection killed twice a second. dqlite: the
    # leader killed once, then the workload carries on through the election
    # (about 5 s here); killing faster than elections would lose the quorum.
    cluster = backend.cluster is not None
    end = time.monotonic() + s.failover_seconds + (10.0 if cluster else 0.0)
    while time.monotonic() < end:
        time.sleep(1.0 if cluster else 0.5)
        if cluster and kills:
            continue
        with counting.lock:
            victims = list(counting.opened)
        if backend.kill(victims, wait=False):
            kills.append(time.monotonic())
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    rows = backend.execute(f"SELECT k, count(*) FROM {table} GROUP BY k")
    counts = {r[0]: int(r[1]) for r in rows}
    recover = []
    for k in kills:
        after = [t for t in reads_ok if t > k]
        if after:
            recover.append(min(after) - k)
    _close({name: p})
    backend.execute(f"DROP TABLE IF EXISTS {table}")
    return {
        "kills": len(kills),
        "reads_ok": len(reads_ok),
        "read_errors_reaching_app": read_errors[0],
        "write_errors_reaching_app": write_errors[0],
        "writes_acknowledged": len(acked),
        "writes_lost": sum(1 for k in acked if k not in counts),
        "writes_duplicated": sum(1 for c in counts.values() if c > 1),
        "recover_ms": summary([x * 1000 for x in recover]) if recover else None,
    }


# ----------------------------------------------------------------------- spike


def spike(names: list[str], backend: Backend, s: Settings) -> dict[str, Any]:
    """50 threads arriving at once on an empty pool (max 10; QueuePool with its
    default max_overflow=10) whose connect takes 150 ms."""
    names = [n for n in names if n not in ("raw", "bare")]
    rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(s.spike_rounds):
        order = list(names)
        random.shuffle(order)
        for name in order:
            rounds[name].append(_spike_one(name, backend))
        s.progress(f"spike round {r + 1}/{s.spike_rounds}")
    out: dict[str, Any] = {"threads": 50, "max_size": 10, "connect_delay_s": 0.15, "peers": {}}
    for name, rs in rounds.items():
        out["peers"][name] = {
            "opened": summary([x["opened"] for x in rs]),
            "last_wait_s": summary([x["last_wait"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
        }
    return out


def _spike_one(name: str, backend: Backend) -> dict[str, float]:
    counting = Counting(backend.connect, delay=0.15)
    # psycopg_pool starts empty like the others (min_size=0), and grows on demand
    p = peers_mod.make(name, counting, 10, dsn=backend.dsn, overflow=10, backend=backend.name, min_size=0)
    barrier = threading.Barrier(50)
    waits: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            h = p.checkout()
        except Exception:
            errors[0] += 1
            return
        waited = time.perf_counter() - t0
        try:
            _query(p.conn(h))
            time.sleep(0.005)
        finally:
            p.checkin(h)
        with lock:
            waits.append(waited)

    ts = [threading.Thread(target=worker) for _ in range(50)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    opened = counting.count
    _close({name: p})
    return {"opened": float(opened), "last_wait": max(waits) if waits else float("nan"), "errors": errors[0]}


SCENARIOS: dict[str, Callable[[list[str], Backend, Settings], dict[str, Any]]] = {
    "checkout": checkout,
    "query": query,
    "contention": contention,
    "liveness": liveness,
    "failover": failover,
    "spike": spike,
}
