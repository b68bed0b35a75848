"""A real dqlite cluster for tests: N ``dqlite-demo`` processes (Debian
package ``go-dqlite``) on free loopback ports in a temporary directory.

    with DqliteCluster(3) as cluster:
        connect = poolkit.failover(*cluster.connects(database="app"))
        pool = poolkit.Pool(connect, max_size=4)
        cluster.kill(cluster.leader())      # SIGKILL the leader
        ...

``start()`` returns once a leader is elected and every node is a voter;
``stop()`` (and leaving the ``with`` block) kills every process and removes
the directory, also when a test failed. Leadership is found with the
``dqlite`` shell's ``.leader``; nodes are stopped with SIGKILL, paused with
SIGSTOP and resumed with SIGCONT, and restarted on their own data.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DqliteCluster", "DqliteNode", "DqliteUnavailable", "free_port"]


class DqliteUnavailable(RuntimeError):
    """``dqlite-demo`` or ``dqlite`` is not installed (``apt-get install go-dqlite``)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DqliteNode:
    index: int
    api: str
    address: str  # the database address clients and peers use
    directory: str
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    log: Any = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class DqliteCluster:
    def __init__(self, size: int = 3, *, directory: str | None = None, ready_timeout: float = 30.0) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        for tool in ("dqlite-demo", "dqlite"):
            if shutil.which(tool) is None:
                raise DqliteUnavailable(f"{tool} is not on PATH: apt-get install go-dqlite")
        self.size = size
        self.ready_timeout = ready_timeout
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="poolkit-dqlite-")
        self.nodes: list[DqliteNode] = []
        for i in range(size):
            d = os.path.join(self.directory, f"node{i}")
            os.makedirs(d, exist_ok=True)
            self.nodes.append(DqliteNode(i, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", d))

    # ------------------------------------------------------------ lifecycle

    def _spawn(self, node: DqliteNode, join: bool) -> None:
        cmd = ["dqlite-demo", "--api", node.api, "--db", node.address, "--dir", node.directory]
        if join:
            cmd += ["--join", ",".join(n.address for n in self.nodes if n is not node)]
        node.log = open(os.path.join(self.directory, f"node{node.index}.log"), "ab")  # noqa: SIM115
        node.proc = subprocess.Popen(cmd, stdout=node.log, stderr=subprocess.STDOUT, start_new_session=True)
        node.paused = False

    def start(self) -> DqliteCluster:
        try:
            self._spawn(self.nodes[0], join=False)
            self._wait(lambda: self.leader() is not None, "the first node to lead")
            for node in self.nodes[1:]:
                self._spawn(node, join=True)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until a leader is elected and every running node is a voter."""
        running = [n for n in self.nodes if n.running and not n.paused]

        def ready() -> bool:
            roles = self.roles()
            return self.leader() is not None and all(roles.get(n.address) == "voter" for n in running)

        self._wait(ready, "a leader and all voters", timeout)

    def stop(self) -> None:
        """Kill every node and remove the data directory. Idempotent."""
        for node in self.nodes:
            if node.proc is not None:
                if node.paused:
                    self._signal(node, signal.SIGCONT)
                if node.proc.poll() is None:
                    node.proc.kill()
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
                node.proc = None
            if node.log is not None:
                node.log.close()
                node.log = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DqliteCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------- queries

    def _shell(self, command: str, nodes: list[DqliteNode] | None = None, timeout: float = 3.0) -> str | None:
        targets = [n for n in (nodes or self.nodes) if n.running and not n.paused]
        if not targets:
            return None
        try:
            out = subprocess.run(
                ["dqlite", "-s", ",".join(n.address for n in targets), "poolkit", command],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    def leader(self) -> DqliteNode | None:
        """The node that leads now, or None (no quorum, or an election going on)."""
        out = self._shell(".leader")
        for node in self.nodes:
            if out and out.splitlines()[0].strip() == node.address:
                return node if node.running and not node.paused else None
        return None

    def roles(self) -> dict[str, str]:
        out = self._shell(".cluster") or ""
        roles = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                roles[parts[1]] = parts[2]
        return roles

    # ---------------------------------------------------------------- chaos

    def _signal(self, node: DqliteNode, sig: signal.Signals) -> None:
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, sig)

    def kill(self, node: DqliteNode) -> None:
        """SIGKILL: the node is gone at once, as in a crash."""
        if node.proc is not None:
            if node.paused:
                self._signal(node, signal.SIGCONT)
            node.proc.kill()
            node.proc.wait(10)
            node.paused = False

    def pause(self, node: DqliteNode) -> None:
        """SIGSTOP: the node stops answering but keeps its sockets open."""
        self._signal(node, signal.SIGSTOP)
        node.paused = True

    def resume(self, node: DqliteNode) -> None:
        self._signal(node, signal.SIGCONT)
        node.paused = False

    def restart(self, node: DqliteNode) -> None:
        """Kill (if running) and start again on the node's own data."""
        self.kill(node)
        self._spawn(node, join=True)

    def wait_for_leader(self, timeout: float | None = None) -> DqliteNode:
        self._wait(lambda: self.leader() is not None, "a leader", timeout)
        leader = self.leader()
        assert leader is not None
        return leader

    def _wait(self, pred: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"dqlite cluster in {self.directory}: timed out waiting for {what}")
            time.sleep(0.1)

    # -------------------------------------------------------------- clients

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def connects(self, database: str = "poolkit", **kwargs: Any) -> list[Callable[[], Any]]:
        """One connect callable per node, for :func:`poolkit.failover`."""
        import dqlitedbapi

        kwargs.setdefault("check_same_thread", False)
        kwargs.setdefault("timeout", 3.0)
        return [functools.partial(dqlitedbapi.connect, a, database=database, **kwargs) for a in self.addresses]
