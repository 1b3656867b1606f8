"""The stream record: the fields of DESIGN section 4, and their JSON form."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ._state import Status, check_transition

#: The record fields of the public contract, in their documented order.
RECORD_FIELDS: tuple[str, ...] = (
    "id", "route", "method", "path", "status", "reason", "upstream_status", "created_at",
    "first_byte_at", "ended_at", "client_gone_at", "bytes", "events", "detached",
)
_TIME_FIELDS = frozenset({"created_at", "first_byte_at", "ended_at", "client_gone_at"})


def new_stream_id() -> str:
    """A 32-character hex id, sortable by creation time: a 48-bit millisecond clock, then 80
    random bits (``secrets``), so an id cannot be guessed from another one."""
    ms = time.time_ns() // 1_000_000
    return f"{ms:012x}{secrets.token_hex(10)}"


def new_instance_id() -> str:
    """``<host>/<pid>/<process start time>/<random>``: enough for start-up recovery to tell a
    live instance from a dead one on the same host (:func:`owner_alive`)."""
    pid = os.getpid()
    return f"{os.uname().nodename}/{pid}/{_process_start(pid) or 0}/{secrets.token_hex(4)}"


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def owner_alive(instance: str) -> bool:
    """Whether the instance that wrote ``instance`` still runs.

    True only for an instance of this host whose process (same pid, same start time, so a
    reused pid does not count) still exists. An id from another host, or in an older format,
    counts as gone: one SQLite journal belongs to the processes of one host (container).
    """
    parts = instance.split("/")
    if len(parts) != 4 or parts[0] != os.uname().nodename:
        return False
    try:
        pid, start = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    now = _process_start(pid)
    if now is not None:
        return start != 0 and now == start
    if start != 0:
        return False  # it had a start time: /proc exists here, and the process is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


@dataclass(slots=True, eq=False)
class Record:
    """A stream's record as the proxy keeps it in memory; rows in the journal mirror it."""

    id: str
    instance: str
    route: str
    method: str
    path: str
    status: Status = Status.OPEN
    reason: str | None = None
    upstream_status: int | None = None
    created_at: float = field(default_factory=time.time)
    first_byte_at: float | None = None
    ended_at: float | None = None
    client_gone_at: float | None = None
    bytes: int = 0
    events: int = 0
    detached: bool = False
    last_event_id: str | None = None
    owner: str | None = None  # sha256 of the creating request's credential (never the credential)
    # Journal bookkeeping (not columns): body bytes handed to a transaction, and bytes durable.
    journaled: int = 0
    durable: int = 0
    stored: bool = False  # a committed transaction wrote its row

    def finish(self, status: Status, reason: str | None, now: float | None = None) -> None:
        check_transition(self.status, status)
        self.status = status
        self.reason = reason
        self.ended_at = time.time() if now is None else now

    def row(self) -> dict[str, Any]:
        """A plain dict of every stored column (times as epoch seconds)."""
        return {
            "id": self.id, "instance": self.instance, "route": self.route,
            "method": self.method, "path": self.path, "status": str(self.status),
            "reason": self.reason, "upstream_status": self.upstream_status,
            "created_at": self.created_at, "first_byte_at": self.first_byte_at,
            "ended_at": self.ended_at, "client_gone_at": self.client_gone_at,
            "bytes": self.bytes, "events": self.events, "detached": self.detached,
            "last_event_id": self.last_event_id, "owner": self.owner,
        }


def record_json(row: dict[str, Any]) -> dict[str, Any]:
    """The public JSON form of a stored row: contract fields only, times as RFC 3339 UTC."""
    out: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        value = row.get(name)
        if name in _TIME_FIELDS:
            value = rfc3339(value)
        elif name == "detached":
            value = bool(value)
        out[name] = value
    return out
