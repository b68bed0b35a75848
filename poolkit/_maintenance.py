"""The maintenance thread: one per pool, holding only a weak reference to it,
so an abandoned pool is still garbage collected and its thread ends.

Once the pool is closed, the thread goes on only while a connection's
return or ping still waits for its server (see ``Pool._guarded_wait``):
it cuts that connection when its ``ping_timeout`` is up, as it would have
in an open pool, so that the thread waiting in the driver is not left
hanging until TCP gives up (``Pool.close`` waits for that, within its
timeout)."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poolkit.pool import Pool

logger = logging.getLogger("poolkit.maintenance")


def start_maintenance(pool: Pool) -> threading.Thread:
    # What the thread needs of the pool is read here: the loop below must
    # name nothing of it but ``ref``, or its closure holds the pool (a cell
    # for ``pool``), which then lives, with its connections open, as long as
    # the thread, which ends only once the pool is gone.
    ref = weakref.ref(pool)
    stop = pool._stop
    wake = pool._wake
    interval = pool._maintenance_interval
    tick = pool._tick
    name = f"poolkit-maintenance-{pool.name}"

    def loop() -> None:
        # A round every interval, and a read of the pool's clock for its hot
        # path every tick (see Pool._tick_clock); in between, a wake at the
        # deadline of the earliest guarded wait (see Pool._guarded_wait), so
        # that a cut comes on time, not at the next round. The thread sleeps
        # on the pool's _wake until _wake_at: a wait guarded meanwhile and due
        # before that wakes it (while it works out when to wake, _wake_at is
        # inf, so any wait guarded then does), and it sleeps again until the
        # earliest.
        next_round = time.monotonic() + interval
        due: float | None = None  # on the pool's clock
        while True:
            p = ref()
            if p is None:
                break
            wait = min(next_round - time.monotonic(), tick)
            if due is not None:
                wait = min(wait, due - p._clock())
            wait = max(0.0, wait)
            p._wake_at = p._clock() + wait
            del p
            wake.wait(wait)
            wake.clear()
            if stop.is_set():
                break
            p = ref()
            if p is None or p.closed:
                break
            p._wake_at = math.inf
            try:
                p._tick_clock()
                if time.monotonic() >= next_round:
                    next_round = time.monotonic() + interval
                    due = p._maintain()
                    p._tick_clock()  # the round may have waited for a server
                else:
                    due = p._cut_overdue(p._clock())
            except Exception:
                due = None
                logger.exception("pool %r: maintenance round failed", p.name)
            del p
        # closed: cut what still waits for a silent server, then end
        while (p := ref()) is not None:
            try:
                due = p._cut_overdue(p._clock())
                if due is None:
                    return
                wait = min(interval, max(0.0, due - p._clock()))
            except Exception:
                logger.exception("pool %r: cutting a connection after close failed", p.name)
                return
            del p
            time.sleep(wait)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
