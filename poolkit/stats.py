"""Pool statistics: a frozen snapshot, JSON export written atomically, and
the Prometheus text format."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

__all__ = ["PoolStats", "write_json_atomic"]

_GAUGES = ("max_size", "open", "opening", "in_use", "idle", "waiting", "generation")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool, taken under its lock: the numbers agree with
    each other. Counters count since the pool was made or ``reset_stats()``."""

    name: str
    # gauges
    max_size: int
    open: int
    opening: int
    in_use: int
    idle: int
    waiting: int
    generation: int
    # counters
    acquired: int
    wait_count: int
    wait_time: float
    timeouts: int
    created: int
    closed: int
    closed_bad: int
    closed_expired: int
    closed_idle: int
    closed_invalidated: int
    closed_invalid: int
    pings: int
    ping_failures: int
    retries: int
    connect_errors: int
    #: connects whose caller stopped waiting (timed out, interrupted): they
    #: went on, and what they made joined the pool
    connects_abandoned: int
    #: connections cut because their server did not answer the pool's
    #: rollback, reset or ping within ping_timeout (closed as bad, too)
    cuts: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def prometheus(self, prefix: str = "poolkit") -> str:
        """The snapshot in the Prometheus text exposition format."""
        label = json.dumps(self.name)  # a JSON string is a valid label value
        lines = []
        for field in dataclasses.fields(self):
            if field.name == "name":
                continue
            kind = "gauge" if field.name in _GAUGES else "counter"
            metric = f"{prefix}_{field.name}" + ("_total" if kind == "counter" and field.name != "wait_time" else "")
            if field.name == "wait_time":
                metric = f"{prefix}_wait_seconds_total"
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric}{{pool={label}}} {getattr(self, field.name)}")
        return "\n".join(lines) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader (or a process
    killed half-way) sees the old file or the new one, never a torn one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
