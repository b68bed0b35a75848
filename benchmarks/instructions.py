"""Instructions per checkout + checkin, counted by valgrind's callgrind.

    python -m benchmarks.instructions [--backend sqlite|postgresql|mariadb] [--pools bare,poolkit] [-n 20000]

Timings on these machines swing by 2x within a second; an instruction count
does not: for the same interpreter, code and hash seed it is the same from
run to run, whatever else the machine does. That makes it the tool for
telling whether a change to the hot path saves 2% or costs it, which the
runner's medians cannot resolve. It is not a speed figure: instructions
differ in cost, and the kernel's share (the probe's ``epoll_wait``) is not
counted. Speed is what the runner shows.

Each pool runs twice under callgrind, with no cycles and with ``n`` cycles
of the runner's own checkout and checkin calls (see ``peers``); the
difference over ``n`` is what one cycle costs, set-up and interpreter start
cancelled out.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

_COLLECTED = re.compile(rb"Collected : (\d+)")


def _child(pool: str, backend: str, n: int) -> None:
    """Run ``n`` checkout + checkin cycles of ``pool`` (inside callgrind)."""
    from benchmarks import peers
    from benchmarks.backends import open_backend

    b = open_backend(backend, None)
    p = peers.make(pool, peers.Counting(b.connect), 4, dsn=b.dsn, backend=backend)
    p.warm()
    co, ci = p.checkout, p.checkin
    for _ in range(200):  # warm the interpreter's specialisations
        ci(co())
    for _ in range(n):
        ci(co())
    p.close()


def count(pool: str, backend: str, n: int) -> int:
    """Instructions that ``n`` cycles of ``pool`` execute, as callgrind counts them."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # dict layouts, and so the count, repeat
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        pool,
        "--backend",
        backend,
        "-n",
        str(n),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"callgrind run of {pool} failed (exit {done.returncode}): {' | '.join(tail)}")
    return int(found.group(1))


def per_cycle(pool: str, backend: str, n: int) -> float:
    return (count(pool, backend, n) - count(pool, backend, 0)) / n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql", "mariadb"])
    ap.add_argument("--pools", default="bare,poolkit", help="comma-separated peers (see benchmarks/peers.py)")
    ap.add_argument("-n", type=int, default=20_000, help="cycles counted per pool")
    ap.add_argument("--child", metavar="POOL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n < 1 and args.child is None:
        ap.error("-n must be at least 1")
    if args.child is not None:
        _child(args.child, args.backend, args.n)
        return 0
    from benchmarks import peers

    try:
        names = peers.parse_names(args.pools)
    except ValueError as exc:
        ap.error(str(exc))
    if not names:
        ap.error("--pools names no pool")
    if shutil.which("valgrind") is None:
        print("benchmarks.instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    counts = {}
    for name in names:
        why = peers.available(name, args.backend)
        if why is not None:
            print(f"{name}: skipped ({why})")
            continue
        counts[name] = per_cycle(name, args.backend, args.n)
    base = counts.get("bare")
    print(
        f"instructions per checkout + checkin ({args.backend}, Python {sys.version.split()[0]}, callgrind, n={args.n})"
    )
    for name, c in counts.items():
        ratio = f"  {c / base:.2f}x bare" if base and name != "bare" else ""
        print(f"{name:18s} {c:10,.0f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
