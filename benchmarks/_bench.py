"""Shared pieces of the benchmark processes: the event format, the wire decoder, CPU accounting.

Event format (exactly ``EVENT_SIZE`` = 100 bytes, one SSE event, written upstream as one HTTP
chunk)::

    data: SSSSSSSS TTTTTTTTTTTTTTTTTTT xxxx...xxxx\\n\\n

``S`` is the event's sequence number in its stream (8 digits), ``T`` the upstream's
``time.monotonic_ns()`` just before the write (19 digits; CLOCK_MONOTONIC is system-wide on
Linux, so the load client can subtract it from its own clock). The fixed size lets the client
find event boundaries by offset alone, whatever chunking the proxy produced.

With ``ts=0`` in the request target the upstream writes ``T = 0``: a stream's bytes are then
fully deterministic, ``upstream_bytes(n)`` (the drain scenario compares journal bodies and
client bytes with it, byte for byte).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

EVENT_SIZE = 100
_PAD = b"x" * EVENT_SIZE
_HEAD_LEN = len(b"data: %08d %019d " % (0, 0))  # 35
CHUNK_PREFIX = b"%x\r\n" % EVENT_SIZE


def make_event(seq: int, ts_ns: int = 0) -> bytes:
    head = b"data: %08d %019d " % (seq, ts_ns)
    return head + _PAD[: EVENT_SIZE - _HEAD_LEN - 2] + b"\n\n"


def make_chunk(seq: int, ts_ns: int = 0) -> bytes:
    """One event framed as one HTTP/1.1 chunk."""
    return CHUNK_PREFIX + make_event(seq, ts_ns) + b"\r\n"


_STREAM = bytearray()


def upstream_bytes(n: int, start: int = 0) -> bytes:
    """Bytes ``start`` to ``n`` of the body the upstream sends with ``ts=0`` (events 0, 1,
    ...)."""
    if len(_STREAM) < n:
        first = len(_STREAM) // EVENT_SIZE
        _STREAM.extend(b"".join([make_event(i) for i in range(first, -(-n // EVENT_SIZE))]))
    return bytes(_STREAM[start:n])


def is_upstream_prefix(data: bytes | bytearray) -> bool:
    """True if ``data`` is a byte-exact prefix of a ``ts=0`` upstream body."""
    return data == upstream_bytes(len(data))


class ProtocolError(Exception):
    pass


class ResponseReader:
    """Sans-IO reader of one HTTP/1.1 response carrying fixed-size events.

    Accepts chunked or Content-Length bodies (or EOF-delimited with ``eof()``); checks every
    event's prefix, suffix and sequence number; optionally records the latency of each event
    (receive time minus the upstream's embedded timestamp) into ``latencies`` (ns).

    With ``raw`` (a bytearray) the body is not checked as events but appended to ``raw`` as
    it arrives (the drain scenario: the body ends with a ``keepstream-reconnect`` event).

    With ``exact`` (a ``ts=0`` body, no latencies) every body byte is compared with
    ``upstream_bytes`` instead (one comparison per piece, not a Python loop per event: the
    bulk scenario's load client must outrun the proxy).
    """

    __slots__ = ("_buf", "_chunk_left", "_ev", "_length_left", "_stage", "body_bytes",
                 "done", "error_body", "events", "exact", "headers", "latencies", "raw",
                 "status")

    def __init__(self, latencies: list[int] | None = None,
                 raw: bytearray | None = None, exact: bool = False) -> None:
        self._buf = bytearray()
        self._ev = bytearray()
        self._stage = "head"  # head, size, data, crlf, trailer, length, eof, done
        self._chunk_left = 0
        self._length_left = 0
        self.status = 0
        self.events = 0
        self.body_bytes = 0
        self.done = False
        self.latencies = latencies
        self.raw = raw
        self.exact = exact and latencies is None and raw is None
        #: Response header fields, lower-case names (the last one wins).
        self.headers: dict[bytes, bytes] = {}
        #: The body of a non-200 response (not checked as events), else None.
        self.error_body: bytearray | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        now = time.monotonic_ns() if self.latencies is not None else 0
        while True:
            stage = self._stage
            if stage == "size":
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(bytes(buf[pos:i]).split(b";", 1)[0], 16)
                pos = i + 2
                if size == 0:
                    self._stage = "trailer"
                else:
                    self._chunk_left = size
                    self._stage = "data"
            elif stage == "data":
                take = min(self._chunk_left, len(buf) - pos)
                if take == 0:
                    break
                self._body(buf[pos:pos + take], now)
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._stage = "crlf"
            elif stage == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("bad chunk terminator")
                pos += 2
                self._stage = "size"
            elif stage == "trailer":
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                empty = i == pos
                pos = i + 2
                if empty:  # the blank line after the (skipped) trailer fields
                    self._finish()
            elif stage == "length":
                take = min(self._length_left, len(buf) - pos)
                if take:
                    self._body(buf[pos:pos + take], now)
                    pos += take
                    self._length_left -= take
                if self._length_left == 0:
                    self._finish()
                break
            elif stage == "eof":
                if len(buf) > pos:
                    self._body(buf[pos:], now)
                pos = len(buf)
                break
            elif stage == "head":
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                self._head(bytes(buf[pos:i]))
                pos = i + 4
            else:
                if len(buf) > pos:
                    raise ProtocolError("bytes after the end of the response")
                break
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        self.status = int(parts[1])
        chunked = False
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            self.headers[name] = value.strip()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value.strip())
        self.error_body = None if self.status == 200 else bytearray()
        if chunked:
            self._stage = "size"
        elif length is not None:
            self._length_left = length
            self._stage = "length"
            if length == 0:
                self._finish()
        else:
            self._stage = "eof"

    def eof(self) -> None:
        """The connection ended; legal only for an EOF-delimited body."""
        if self._stage == "eof":
            self._finish()
        elif not self.done:
            raise ProtocolError(f"connection closed in stage {self._stage!r}")

    def _finish(self) -> None:
        if self.error_body is not None:
            raise ProtocolError(f"status {self.status}: {bytes(self.error_body)!r}")
        stray = len(self._ev) or (self.body_bytes % EVENT_SIZE if self.exact else 0)
        if stray:
            raise ProtocolError(f"body ends inside an event ({stray} stray bytes)")
        self._stage = "done"
        self.done = True

    def _body(self, data: bytearray, now: int) -> None:
        if self.error_body is not None:
            self.error_body += data[:max(0, 500 - len(self.error_body))]
            return
        start = self.body_bytes
        self.body_bytes += len(data)
        if self.exact:
            if data != upstream_bytes(self.body_bytes, start):
                raise ProtocolError(f"body bytes {start}-{self.body_bytes} differ from the "
                                    "upstream's")
            self.events = self.body_bytes // EVENT_SIZE
            return
        if self.raw is not None:
            self.raw += data
            return
        ev = self._ev
        ev += data
        n = len(ev) // EVENT_SIZE
        if not n:
            return
        seq = self.events
        lat = self.latencies
        for k in range(0, n * EVENT_SIZE, EVENT_SIZE):
            if ev[k:k + 6] != b"data: " or ev[k + 98:k + 100] != b"\n\n":
                raise ProtocolError(f"malformed event {bytes(ev[k:k + EVENT_SIZE])!r}")
            if int(ev[k + 6:k + 14]) != seq:
                raise ProtocolError(f"event {int(ev[k + 6:k + 14])} out of order, want {seq}")
            if lat is not None:
                lat.append(now - int(ev[k + 15:k + 34]))
            seq += 1
        self.events = seq
        del ev[:n * EVENT_SIZE]


# -- CPU accounting ---------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (all their threads,
    including threads that already exited), from ``/proc/<pid>/stat``."""
    ticks = 0
    for p in descendants(pid):
        f = _stat_fields(p)
        if f is not None:
            ticks += int(f[11]) + int(f[12])  # utime, stime
    return ticks / CLK_TCK


def tree_rss_kib(pid: int) -> int:
    """Resident memory (KiB) of ``pid`` and its live descendants, from ``/proc/<pid>/status``."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pin_to(cpu: int | None) -> None:
    """Pin the calling process to one CPU (no-op when ``cpu`` is None)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def cpu_times(cpu: int) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU since boot, from ``/proc/stat``.
    ``busy`` counts everything but idle, iowait and steal."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
                busy = user + nice + system + irq + softirq
                total = busy + idle + iowait + steal
                return busy / CLK_TCK, steal / CLK_TCK, total / CLK_TCK
    raise ValueError(f"no cpu{cpu} in /proc/stat")
