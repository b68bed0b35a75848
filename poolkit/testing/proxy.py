"""A chaos TCP proxy on loopback, between a pool and a real server.

    with ChaosProxy("127.0.0.1", 5432) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test"
        proxy.latency(0.005, jitter=0.005)   # added latency and jitter, each way
        proxy.reset_all()                    # every open connection is reset (a server restart)
        proxy.refuse()                       # new connections are refused (server down)...
        proxy.accept()                       # ...and accepted again
        proxy.blackhole()                    # accepts, never answers (a dead route); proxy.heal() ends it
        proxy.cut_reply_after(b"COMMIT")     # the next request containing these bytes reaches the
                                             # server, its reply never reaches the client: did my write happen?
        proxy.slow_close(0.5)                # closing a connection takes this long

Each client connection gets its own upstream connection and two pump
threads. Everything runs in daemon threads; ``stop()`` (or leaving the
``with`` block) closes every socket and joins them.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

__all__ = ["ChaosProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def _rst(sock: socket.socket) -> None:
    """Reset the connection. close() alone does not do it while another thread
    is blocked in recv() on the socket (Linux keeps the socket alive for that
    call, and nothing is sent): shutdown() wakes the reader first, and with a
    zero linger the last close sends the RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection and its upstream."""

    def __init__(self, proxy: ChaosProxy, client: socket.socket, upstream: socket.socket | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.dead = threading.Event()
        self.muted = False  # the server's replies are dropped (cut reply / blackhole)

    def start(self) -> None:
        if self.upstream is None:
            return  # blackholed at accept: hold the client, never answer
        threading.Thread(target=self._pump, args=(self.client, self.upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.upstream, self.client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        p = self.proxy
        try:
            while not self.dead.is_set():
                try:
                    data = src.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                delay = p._delay()
                if delay:
                    time.sleep(delay)
                if to_server:
                    cut = p._take_cut(data)
                    if cut:
                        self.muted = True  # before sending: on loopback the reply can be back at once
                    dst.sendall(data)
                    if cut:  # the request went through; its reply never comes back
                        time.sleep(p._cut_grace)
                        self.kill()
                        return
                elif self.muted or p._blackholed:
                    continue
                else:
                    dst.sendall(data)
        except OSError:
            pass
        self.kill(graceful=True)

    def kill(self, graceful: bool = False) -> None:
        if self.dead.is_set():
            return
        self.dead.set()
        if graceful and self.proxy._slow_close:
            time.sleep(self.proxy._slow_close)
        for s in (self.client, self.upstream):
            if s is not None:
                if graceful:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
                else:
                    _rst(s)
        self.proxy._forget(self)


class ChaosProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()  # protects _links, _cuts and the switches below
        self._links: list[_Link] = []
        self._latency = 0.0
        self._jitter = 0.0
        self._refusing = False
        self._blackholed = False
        self._slow_close = 0.0
        self._cuts: list[bytes] = []
        self._cut_grace = 0.2
        self._random = random.Random()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, port))
        self._listener.listen(128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        #: connections accepted so far
        self.accepted = 0

    # -------------------------------------------------------------- control

    def start(self) -> ChaosProxy:
        self._thread = threading.Thread(target=self._serve, name=f"chaos-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self.reset_all()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Add ``seconds`` (plus up to ``jitter``) to every chunk, each way."""
        with self._lock:
            self._latency, self._jitter = seconds, jitter

    def reset_all(self) -> int:
        """Reset every open connection (RST), as a server restart does.
        Returns how many."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.kill()
        return len(links)

    def refuse(self) -> None:
        """New connections are reset at once, as by a server that is down."""
        with self._lock:
            self._refusing = True

    def accept(self) -> None:
        with self._lock:
            self._refusing = False

    def blackhole(self) -> None:
        """Accept, never answer: new connections are held, replies on open
        ones are dropped."""
        with self._lock:
            self._blackholed = True

    def heal(self) -> None:
        """End every fault: no latency, accepting, no blackhole, no pending cut."""
        with self._lock:
            self._blackholed = False
            self._refusing = False
            self._latency = self._jitter = 0.0
            self._cuts = []
            self._slow_close = 0.0

    def cut_reply_after(self, marker: bytes, grace: float = 0.2) -> None:
        """The next request whose bytes contain ``marker`` is sent to the
        server; after ``grace`` seconds the connection is reset and the reply
        never reaches the client."""
        with self._lock:
            self._cuts.append(marker)
            self._cut_grace = grace

    def slow_close(self, seconds: float) -> None:
        with self._lock:
            self._slow_close = seconds

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    # ------------------------------------------------------------ internals

    def _delay(self) -> float:
        if not self._latency and not self._jitter:
            return 0.0
        with self._lock:
            return self._latency + self._random.random() * self._jitter

    def _take_cut(self, data: bytes) -> bool:
        if not self._cuts:
            return False
        with self._lock:
            for marker in self._cuts:
                if marker in data:
                    self._cuts.remove(marker)
                    return True
        return False

    def _forget(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                refusing, blackholed = self._refusing, self._blackholed
            if refusing:
                _rst(client)
                continue
            upstream = None
            if not blackholed:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _rst(client)
                    continue
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
            link.start()

    def __repr__(self) -> str:
        return f"<ChaosProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}>"
