"""The maintenance thread: one per pool, holding only a weak reference to it,
so an abandoned pool is still garbage collected and its thread ends."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poolkit.pool import Pool

logger = logging.getLogger("poolkit.maintenance")


def start_maintenance(pool: Pool) -> threading.Thread:
    ref = weakref.ref(pool)
    stop = pool._stop
    interval = pool._maintenance_interval
    name = f"poolkit-maintenance-{pool.name}"

    def loop() -> None:
        while not stop.wait(interval):
            p = ref()
            if p is None or p.closed:
                return
            try:
                p._maintain()
            except Exception:
                logger.exception("pool %r: maintenance round failed", p.name)
            del p

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
