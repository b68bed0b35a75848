"""python -m benchmarks [--backend sqlite|postgresql|mariadb|dqlite] [--scenario ...] [--quick]"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

from benchmarks import peers as peers_mod
from benchmarks import report
from benchmarks.backends import open_backend
from benchmarks.scenarios import SCENARIOS, Settings


def _scenarios(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS and n != "all"]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or repr(value)}; choose from {', '.join(SCENARIOS)}, all"
        )
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="poolkit against SQLAlchemy's QueuePool, psycopg_pool and DBUtils, on real databases.",
    )
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql", "mariadb", "dqlite"])
    ap.add_argument(
        "--dsn",
        default=None,
        help="connection string (PostgreSQL), 'host=.. user=..' (MariaDB), "
        "or a file path (SQLite); defaults to this machine's servers",
    )
    ap.add_argument(
        "--scenario",
        action="append",
        type=_scenarios,
        help=f"one or several, comma-separated or repeated, from: {', '.join(SCENARIOS)}, all; default: all",
    )
    ap.add_argument(
        "--pools", default=",".join(peers_mod.ALL), help=f"comma-separated, from: {', '.join(peers_mod.ALL)}"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: under a minute on SQLite")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per scenario")
    ap.add_argument("--duration", type=float, default=None, help="seconds per contention burst")
    ap.add_argument("--out", default="results", help="folder for the JSON results and the charts")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be positive")
    return args


class Progress:
    """One line, redrawn: a bar, the share done and what runs now."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()

    def __call__(self, what: str) -> None:
        self.done = min(self.total, self.done + 1)
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {frac:4.0%} {time.monotonic() - self.start:5.1f}s {what}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class LogToFile(logging.FileHandler):
    """What the pools log while they run (a peer's traceback for every
    connection the failover kills, poolkit's warnings) goes to a file in the
    results folder instead of over the progress bar; the terminal gets a count."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="w", encoding="utf-8", delay=True)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name.partition(".")[0]] += 1
        super().emit(record)

    def summary(self) -> str:
        total = sum(self.counts.values())
        if not total:
            return "log: nothing at WARNING or above"
        by = ", ".join(f"{name} {n}" for name, n in self.counts.most_common())
        return f"log: {total} messages at WARNING or above ({by}) in {self.baseFilename}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    chosen = [name for names in args.scenario or [] for name in names]
    scenarios = list(SCENARIOS) if not chosen or "all" in chosen else list(dict.fromkeys(chosen))
    try:
        wanted = peers_mod.parse_names(args.pools)
    except ValueError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    try:
        backend = open_backend(args.backend, args.dsn)
    except ImportError as exc:
        extra = "dqlite" if args.backend == "dqlite" else "bench"  # dqlite-dbapi is not in bench
        hint = f"pip install 'poolkit[{extra}]'"
        print(f"benchmarks: the {args.backend} driver is not installed ({exc}); {hint}", file=sys.stderr)
        return 2
    except Exception as exc:
        where = f" at {args.dsn!r}" if args.dsn else " (this machine's default server; --dsn to choose one)"
        print(f"benchmarks: cannot open the {args.backend} backend{where}: {exc}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    names = []
    for p in wanted:
        why = peers_mod.available(p, backend.name)
        if why:
            skipped[p] = why
        else:
            names.append(p)
    q = args.quick
    rounds = args.rounds or (5 if q else 15)
    settings = Settings(
        rounds=rounds,
        burst=500 if q else 2000,
        # short bursts, many rounds: the pools compared run close together in time
        contention_seconds=args.duration or (0.2 if q else 0.5),
        contention_rounds=3 if q and not args.rounds else rounds,
        failover_seconds=2.0 if q else 5.0,
        spike_rounds=1 if q else 3,
    )
    steps = {
        "checkout": settings.rounds,
        "query": settings.rounds,
        "contention": settings.contention_rounds,
        "liveness": 1 + (len(names) if backend.kills else 0),
        "failover": len(names) if backend.kills else 0,
        "spike": settings.spike_rounds,
    }
    settings.progress = Progress(sum(steps[s] for s in scenarios))
    results: dict[str, Any] = {
        "env": report.environment(backend),
        "mode": ("quick" if q else "full") + f", {rounds} rounds, pools: {', '.join(names)}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenarios": {},
        "skipped": skipped,
    }
    os.makedirs(args.out, exist_ok=True)
    log = LogToFile(os.path.join(args.out, f"bench-{backend.name}.log"))
    root = logging.getLogger()
    root.addHandler(log)
    try:
        for name in scenarios:
            results["scenarios"][name] = SCENARIOS[name](names, backend, settings)
    finally:
        backend.close()
        root.removeHandler(log)
        log.close()
    results["targets"] = report.targets(results)
    results["log"] = {"path": log.baseFilename if log.counts else None, "messages": dict(log.counts)}
    path = os.path.join(args.out, f"bench-{backend.name}.json")
    report.write_json(results, path)
    charts = report.charts(results, args.out)
    print(report.render(results))
    if charts is None:
        drawn = "matplotlib not installed"
    else:
        drawn = ", ".join(charts) or "none for these scenarios (checkout, query and contention have one)"
    print(f"\nresults: {path}; charts: {drawn}")
    print(log.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
