"""What the runner shows: tables with ratios, the targets, JSON and charts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from poolkit.stats import write_json_atomic


def environment(backend: Any) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("poolkit", "SQLAlchemy", "psycopg", "psycopg-pool", "DBUtils", "PyMySQL", "tenacity", "dqlite-dbapi"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    server = None
    try:
        if backend.name == "postgresql":
            server = backend.execute("SHOW server_version")[0][0]
        elif backend.name == "mariadb":
            server = backend.execute("SELECT VERSION()")[0][0]
        elif backend.name == "dqlite":
            server = "dqlite (go-dqlite dqlite-demo), 3 nodes"
        else:
            import sqlite3

            server = "SQLite " + sqlite3.sqlite_version
    except Exception:
        pass
    return {
        "machine": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
        "backend": backend.name,
        "server": server,
    }


def env_line(env: dict[str, Any]) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return (
        f"{env['machine']} ({env['cpu']}, {env['cores']} cores), Python {env['python']}, "
        f"{env['backend']} ({env['server']}); {pk}"
    )


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    if unit == "us":
        return f"{x / 1000:.2f}"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _spread(s: dict[str, float], unit: str = "") -> str:
    return f"{_fmt(s['median'], unit)} [{_fmt(s['min'], unit)}..{_fmt(s['max'], unit)}]"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    out = [f"poolkit benchmark: {env_line(results['env'])}", f"mode: {results['mode']}", ""]
    sc = results["scenarios"]
    for name in ("checkout", "query"):
        if name not in sc:
            continue
        r = sc[name]
        rows = []
        for peer, v in r["peers"].items():
            ratio = r["ratio_p50"].get(peer)
            over = r.get("overhead_over_raw_ns", {}).get(peer)
            row = [peer, _spread(v["p50"], "us"), _fmt(v["p99"]["median"], "us")]
            row.append(_spread(ratio) if ratio else "")
            if name == "query":
                row.append(_fmt(over["median"], "us") if over else "")
            rows.append(row)
        header = ["pool", "p50 us [min..max]", "p99 us", "poolkit/peer p50"]
        if name == "query":
            header.append("over raw us (same conn)")
        out += [
            f"== {name}: {'checkout + checkin' if name == 'checkout' else 'checkout + SELECT 1 + checkin'}"
            f" (one thread, pool of 4; medians of {next(iter(r['peers'].values()))['p50']['n']} rounds)",
            table(rows, header),
            "",
        ]
    if "contention" in sc:
        r = sc["contention"]
        rows = []
        for peer, v in r["peers"].items():
            ratio = r["ratio_throughput"].get(peer)
            rows.append(
                [
                    peer,
                    _spread(v["throughput"]),
                    _fmt(v["min_over_max"]["median"]),
                    _fmt(v["starved"]["median"]),
                    _fmt(v["wait_p50_us"]["median"]),
                    _fmt(v["wait_p99_us"]["median"]),
                    _spread(ratio) if ratio else "",
                ]
            )
        out += [
            "== contention: 16 threads, pool of 4, checkout + SELECT 1 + checkin",
            table(
                rows,
                [
                    "pool",
                    "ops/s [min..max]",
                    "least/most",
                    "starved",
                    "wait p50 us",
                    "wait p99 us",
                    "poolkit/peer ops/s",
                ],
            ),
            "",
        ]
    if "liveness" in sc:
        r = sc["liveness"]
        out.append("== liveness")
        out.append(
            f"probe p50: {_fmt(r.get('probe_p50_ns'), 'us')} us; SELECT 1 round trip p50: "
            f"{_fmt(r['select1_p50_ns'], 'us')} us" + (f"  ({r['note']})" if r.get("note") else "")
        )
        if r.get("detection"):
            rows = [
                [p, str(v["killed"]), str(v["errors_reaching_app"]), f"{v['detected']:.0%}"]
                for p, v in r["detection"].items()
            ]
            out.append(table(rows, ["pool", "killed while idle", "errors reaching app", "detected"]))
        out.append("")
    if "failover" in sc:
        r = sc["failover"]
        what = (
            "the leader SIGKILLed"
            if results["env"]["backend"] == "dqlite"
            else "every connection killed twice a second"
        )
        out.append(f"== failover: 4 readers + 1 writer, {what}")
        if r.get("note"):
            out.append(r["note"])
        else:
            rows = []
            for p, v in r["peers"].items():
                rec = v["recover_ms"]
                rows.append(
                    [
                        p,
                        str(v["kills"]),
                        str(v["read_errors_reaching_app"]),
                        str(v["write_errors_reaching_app"]),
                        str(v["writes_acknowledged"]),
                        str(v["writes_lost"]),
                        str(v["writes_duplicated"]),
                        _fmt(rec["median"]) if rec else "-",
                    ]
                )
            out.append(
                table(
                    rows,
                    [
                        "pool",
                        "kills",
                        "read errors",
                        "write errors",
                        "writes acked",
                        "lost",
                        "duplicated",
                        "recover ms p50",
                    ],
                )
            )
        out.append("")
    if "spike" in sc:
        r = sc["spike"]
        rows = [[p, _spread(v["opened"]), _spread(v["last_wait_s"]), str(v["errors"])] for p, v in r["peers"].items()]
        out += [
            "== spike: 50 threads at once, max 10 connections, connect takes 150 ms",
            table(rows, ["pool", "connections opened", "last thread waited s", "errors"]),
            "",
        ]
    if results.get("skipped"):
        out.append("skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()))
    out.append("")
    out.append("== targets")
    for t in results["targets"]:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        out.append(f"[{mark}] {t['target']}: {t['detail']}")
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    sc = results["scenarios"]
    out = []

    def add(target: str, met: bool | None, detail: str) -> None:
        out.append({"target": target, "met": met, "detail": detail})

    if "checkout" in sc:
        r = sc["checkout"]["ratio_p50"]
        for peer, limit in (("queuepool", 1 / 3), ("psycopg_pool", 0.6), ("bare", 1.5)):
            if peer in r:
                v = r[peer]["median"]
                add(f"checkout p50 poolkit/{peer} <= {limit:.2f}", v <= limit, f"{v:.2f}")
    if "query" in sc and "overhead_over_raw_ns" in sc["query"]:
        ov = sc["query"]["overhead_over_raw_ns"].get("poolkit")
        if ov and results["env"]["backend"] == "postgresql":
            add(
                "query overhead over raw <= 10 us (PostgreSQL)", ov["median"] <= 10_000, f"{ov['median'] / 1000:.2f} us"
            )
    if "liveness" in sc and sc["liveness"].get("detection"):
        d = sc["liveness"]["detection"].get("poolkit")
        if d:
            add("server-killed idle connections detected 100%", d["detected"] == 1.0, f"{d['detected']:.0%}")
    if "contention" in sc:
        pk = sc["contention"]["peers"].get("poolkit")
        if pk:
            add("contention: no thread starved", pk["starved"]["median"] == 0, f"{pk['starved']['median']:g}")
            add(
                "contention: least/most served >= 0.8",
                pk["min_over_max"]["median"] >= 0.8,
                f"{pk['min_over_max']['median']:.2f}",
            )
            others = {
                p: v["throughput"]["median"]
                for p, v in sc["contention"]["peers"].items()
                if p not in ("poolkit", "bare", "raw")
            }
            if others:
                best = max(others, key=lambda p: others[p])
                ratio = sc["contention"]["ratio_throughput"].get(best, {}).get("median")
                if ratio is not None:
                    add("contention: throughput >= 1.2x the best peer", ratio >= 1.2, f"{ratio:.2f}x {best}")
    if "spike" in sc:
        peers = sc["spike"]["peers"]
        pk = peers.get("poolkit")
        qp = peers.get("queuepool")
        if pk:
            opened = pk["opened"]["median"]
            ok = opened <= 10 and (qp is None or opened < qp["opened"]["median"])
            add(
                "spike: opens <= max_size and fewer than QueuePool",
                ok,
                f"{opened:g} vs QueuePool {qp['opened']['median']:g}" if qp else f"{opened:g}",
            )
    if "failover" in sc and sc["failover"].get("peers"):
        pk = sc["failover"]["peers"].get("poolkit")
        if pk:
            add(
                "failover: zero read errors reaching the application",
                pk["read_errors_reaching_app"] == 0,
                str(pk["read_errors_reaching_app"]),
            )
            add(
                "failover: zero duplicated or lost writes",
                pk["writes_duplicated"] == 0 and pk["writes_lost"] == 0,
                f"dup {pk['writes_duplicated']}, lost {pk['writes_lost']}",
            )
    return out


def write_json(results: dict[str, Any], path: str) -> None:
    write_json_atomic(path, results)


def charts(results: dict[str, Any], folder: str) -> list[str] | None:
    """PNG charts of latency, throughput and fairness, for the scenarios that
    have one (checkout, query, contention): the paths written, or None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sc = results["scenarios"]
    footer = env_line(results["env"])
    written = []

    def save(fig: Any, name: str) -> None:
        fig.text(0.01, 0.01, footer, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = os.path.join(folder, name)
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        plt.close(fig)
        written.append(path)

    lat = [n for n in ("checkout", "query") if n in sc]
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(6 * len(lat), 4.5), squeeze=False)
        for ax, name in zip(axes[0], lat, strict=True):
            peers = list(sc[name]["peers"])
            med = [sc[name]["peers"][p]["p50"]["median"] / 1000 for p in peers]
            lo = [m - sc[name]["peers"][p]["p50"]["min"] / 1000 for p, m in zip(peers, med, strict=True)]
            hi = [sc[name]["peers"][p]["p50"]["max"] / 1000 - m for p, m in zip(peers, med, strict=True)]
            colors = ["tab:green" if p == "poolkit" else "tab:gray" for p in peers]
            ax.bar(peers, med, yerr=[lo, hi], color=colors, capsize=3)
            ax.set_title(f"{name}: p50 latency per operation ({results['env']['backend']})")
            ax.set_ylabel("microseconds (median of rounds, min..max)")
            ax.tick_params(axis="x", rotation=30)
        save(fig, "latency.png")
    if "contention" in sc:
        c = sc["contention"]["peers"]
        peers = list(c)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        colors = ["tab:green" if p == "poolkit" else "tab:gray" for p in peers]
        axes[0].bar(peers, [c[p]["throughput"]["median"] for p in peers], color=colors)
        axes[0].set_title("contention: throughput (16 threads, pool of 4)")
        axes[0].set_ylabel("operations per second")
        axes[0].tick_params(axis="x", rotation=30)
        for p in peers:
            ops = sorted(c[p]["ops_per_thread_last_round"])
            axes[1].plot(range(1, len(ops) + 1), ops, marker="o", label=p, linewidth=2.5 if p == "poolkit" else 1)
        axes[1].set_title("fairness: operations per thread, sorted (last round)")
        axes[1].set_xlabel("thread (least to most served)")
        axes[1].set_ylabel("operations")
        axes[1].legend(fontsize=7)
        save(fig, "contention.png")
    return written
