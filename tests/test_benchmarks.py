"""The benchmark runner's smoke test: `python -m benchmarks --quick` on
SQLite runs every scenario and writes its JSON and charts. No figure is
asserted: these machines are too noisy for that."""

from __future__ import annotations

import functools
import json
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers
from benchmarks.__main__ import main
from tests.backends import PG_DSN


def test_quick_run_on_sqlite_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "bench-sqlite.json").read_text())
    assert set(data["scenarios"]) == {"checkout", "query", "contention", "liveness", "failover", "spike"}
    assert data["env"]["python"] and data["env"]["packages"]["poolkit"]
    assert "poolkit/peer" in out and "== targets" in out
    for peer in ("poolkit", "queuepool", "dbutils", "raw", "bare"):
        assert peer in data["scenarios"]["checkout"]["peers"]
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pools", "poolkit,nosuchpool", "--scenario", "checkout"]) == 2
    assert "unknown pool(s) nosuchpool" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])


@pytest.mark.parametrize(
    ("backend", "dsn"), [("postgresql", "host=127.0.0.1 port=1 dbname=test"), ("mariadb", "host=127.0.0.1 port=1")]
)
def test_a_server_that_cannot_be_reached_is_named_not_a_traceback(
    backend: str, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--backend", backend, "--dsn", dsn, "--scenario", "checkout"]) == 2
    err = capsys.readouterr().err
    assert f"cannot open the {backend} backend at {dsn!r}" in err
    assert "Traceback" not in err


@pytest.mark.skipif(sys.version_info < (3, 13), reason="the dqlite backend needs Python >= 3.13 (py313 runs this)")
def test_a_missing_dqlite_driver_names_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "dqlitedbapi", None)  # as if not installed: importing it raises
    assert main(["--backend", "dqlite", "--dsn", "127.0.0.1:1", "--scenario", "checkout"]) == 2
    err = capsys.readouterr().err
    assert "the dqlite driver is not installed" in err
    assert "pip install 'poolkit[dqlite]'" in err  # the bench extra does not install it


def test_scenarios_can_be_chosen_comma_separated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--scenario", "checkout,query", "--pools", "raw,poolkit", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench-sqlite.json").read_text())
    assert list(data["scenarios"]) == ["checkout", "query"]
    # the query overhead is measured on the connection each pool hands out; the raw floor has a row too
    assert set(data["scenarios"]["query"]["overhead_over_raw_ns"]) == {"raw", "poolkit"}
    with pytest.raises(SystemExit):
        main(["--scenario", "checkout,nosuch"])
    assert "unknown scenario nosuch" in capsys.readouterr().err


def test_a_run_without_a_charted_scenario_says_so_not_that_matplotlib_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["--quick", "--scenario", "liveness", "--pools", "poolkit", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "charts: none for these scenarios" in out
    assert "matplotlib not installed" not in out
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.integration
def test_what_the_pools_log_goes_to_a_file_not_over_the_progress_bar(
    pg: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the failover scenario kills poolkit's connections, and poolkit warns of each one it discards
    run = ["--quick", "--backend", "postgresql", "--scenario", "failover", "--pools", "poolkit"]
    assert main([*run, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    log = (tmp_path / "bench-postgresql.log").read_text()
    assert "discarded connection" in log
    assert "discarded connection" not in captured.err
    data = json.loads((tmp_path / "bench-postgresql.json").read_text())
    assert data["log"]["messages"]["poolkit"] >= 1
    assert f"log: {sum(data['log']['messages'].values())} messages" in captured.out


@pytest.mark.parametrize(
    ("name", "package"), [("poolkit", "poolkit"), ("queuepool", "sqlalchemy"), ("dbutils", "dbutils")]
)
def test_each_pool_is_queried_through_what_it_hands_out(tmp_path: Path, name: str, package: str) -> None:
    # a peer measured on the driver's connection would skip its own wrappers'
    # cost, and their behaviour (DBUtils runs a failed statement again)
    connect = functools.partial(sqlite3.connect, str(tmp_path / "p.db"), check_same_thread=False)
    p = peers.make(name, peers.Counting(connect), 1)
    try:
        h = p.checkout()
        try:
            assert type(p.conn(h)).__module__.partition(".")[0] == package
            assert isinstance(p.driver_conn(h), sqlite3.Connection)
        finally:
            p.checkin(h)
    finally:
        p.close()


@pytest.mark.parametrize("name", ["poolkit", "queuepool", "dbutils"])
def test_the_runner_times_each_pools_own_calls(tmp_path: Path, name: str) -> None:
    # the timed loop calls p.checkout() and p.checkin(h): they must be the
    # pool's own calls, with no frame of the runner's in between (the bare
    # floor has none, so one here would be charged to the pool compared)
    connect = functools.partial(sqlite3.connect, str(tmp_path / "p.db"), check_same_thread=False)
    counting = peers.Counting(connect)
    p: Any = peers.make(name, counting, 1)
    try:
        assert counting.count == 0  # made empty: the spike scenario counts what each pool opens
        assert p.checkout.__self__ is p.pool
        h = p.checkout()
        assert p.checkin is type(h).close  # handle.close(), as a plain function
        p.checkin(h)
        for _ in range(3):  # a pool of one: each checkin really gave it back
            h = p.checkout()
            p.checkin(h)
        checked_out = {
            "poolkit": lambda: p.pool.stats().in_use,
            "queuepool": lambda: p.pool.checkedout(),
            "dbutils": lambda: p.pool._connections,
        }[name]
        assert checked_out() == 0
    finally:
        p.close()


@pytest.mark.integration
def test_psycopg_pool_is_timed_through_getconn_and_putconn(pg: Any) -> None:
    p: Any = peers.make("psycopg_pool", peers.Counting(pg.connect), 1, dsn=PG_DSN)
    try:
        assert p.checkout.__self__ is p.pool and p.checkout.__name__ == "getconn"
        assert p.checkin.__self__ is p.pool and p.checkin.__name__ == "putconn"
        h = p.checkout()
        p.checkin(h)
        assert p.pool.get_stats()["pool_available"] == 1
    finally:
        p.close()


@pytest.mark.integration
def test_every_pool_serves_the_spike_on_postgresql(pg: Any, tmp_path: Path) -> None:
    # each peer the spike builds must be able to check out (the psycopg_pool
    # one is made empty, min_size=0, and once had no checkout bound: 150 errors)
    run = ["--quick", "--backend", "postgresql", "--scenario", "spike", "--pools", "poolkit,psycopg_pool,dbutils"]
    assert main([*run, "--out", str(tmp_path)]) == 0
    peers_out = json.loads((tmp_path / "bench-postgresql.json").read_text())["scenarios"]["spike"]["peers"]
    assert set(peers_out) == {"poolkit", "psycopg_pool", "dbutils"}
    for name, r in peers_out.items():
        assert r["errors"] == 0, name
        assert 1 <= r["opened"]["median"] <= 10, name


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (apt-get install valgrind)")
def test_instruction_counts_repeat_and_compare_with_the_floor(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import instructions

    # the same run, counted twice: the figure does not swing as timings do
    first = instructions.count("poolkit", "sqlite", 300)
    assert instructions.count("poolkit", "sqlite", 300) == pytest.approx(first, rel=0.01)
    assert instructions.main(["--pools", "bare,poolkit", "-n", "300"]) == 0
    out = capsys.readouterr().out
    assert "instructions per checkout + checkin (sqlite" in out
    assert "x bare" in out.splitlines()[-1]
    with pytest.raises(SystemExit):
        instructions.main(["--pools", "nosuchpool"])
    assert "unknown pool(s) nosuchpool" in capsys.readouterr().err


def test_mariadb_dsn_arguments_are_typed_and_bad_ones_named() -> None:
    from benchmarks.backends import DEFAULT_MYSQL, _mysql_args

    args = _mysql_args(DEFAULT_MYSQL)
    assert args["port"] == 3306 and args["ssl_disabled"] is True and args["password"] == ""
    assert _mysql_args("host=h ssl_disabled=0")["ssl_disabled"] is False
    with pytest.raises(SystemExit, match="ssl_disabled must be true or false"):
        _mysql_args("ssl_disabled=maybe")
    with pytest.raises(SystemExit, match="'host' is not key=value"):
        _mysql_args("host")


@pytest.mark.integration
def test_the_drop_in_cost_runs_each_variant(net_backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import dropin

    assert dropin.main(["--backend", net_backend.name, "--rounds", "1", "-n", "2"]) == 0
    out = capsys.readouterr().out
    for variant in ("reset at return", "reset at checkout", "no reset", "driver's own connect"):
        assert variant in out
    with pytest.raises(SystemExit):
        dropin.main(["--rounds", "0"])


@pytest.mark.integration
@pytest.mark.parametrize("request_ids", [False, True], ids=["no-ids", "request-ids"])
def test_the_soak_keeps_every_write_promise_under_chaos(
    net_backend: Any, request_ids: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # A short run of python -m benchmarks.soak: connections reset, COMMIT
    # replies cut, latency, while workers write. It exits 1 if a call that
    # returned lost its row, one that raised committed it, a row was written
    # twice, or (with ids) a call never returned.
    from benchmarks import soak

    args = ["--backend", net_backend.name, "--seconds", "3", "--workers", "4"]
    assert soak.main(args + (["--request-ids"] if request_ids else [])) == 0
    out = capsys.readouterr().out
    assert "rows written twice: 0" in out and "calls that raised, with a row committed: 0" in out
    calls = int(out.split(" calls (")[0].rsplit(" ", 1)[1])
    assert calls > 100  # it did work, through the chaos
    with pytest.raises(SystemExit):
        soak.main(["--backend", "sqlite"])
