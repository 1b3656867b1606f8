"""Reading a stream again: the journal, then the live tail; resume points; keepstream event ids.

Id format (``resumable = true`` routes): ``ks1.<stream id>.<seq>``, where ``seq`` counts the SSE
events of the upstream's body from 1. Keepstream re-serializes each event for the client with
that id (the upstream's own ``id:`` is replaced; it stays in the journal, byte-exact). A reconnect
to the same URL with ``Last-Event-ID: ks1.<id>.<seq>`` is served from the journal from event
``seq + 1`` on, and then the live tail: no new upstream request, no duplicate, no gap.

Sans-IO parts (:class:`EventRewriter`, :class:`EventSkipper`, :func:`parse_ks_id`) sit next to
:func:`read_stream`, the one async reader every consumer uses.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

from ._sse import Comment, Event, SSEParser
from ._supervisor import MAX_SEND, Lagging, Supervisor

_KS_ID = re.compile(r"^ks1\.([0-9a-f]{1,64})\.([0-9]{1,12})$")


def ks_id(stream_id: str, seq: int) -> str:
    return f"ks1.{stream_id}.{seq}"


def parse_ks_id(value: str) -> tuple[str, int] | None:
    """``(stream id, seq)`` for a keepstream event id, else None."""
    m = _KS_ID.match(value.strip())
    return (m.group(1), int(m.group(2))) if m else None


#: The last bytes a resumable client gets when an upstream line or event is over the caps.
OVERFLOW_NOTE = (b": keepstream: an upstream event is over max_line_bytes/max_event_bytes; "
                 b"this response ends here, the journal keeps every byte\n\n")


class EventRewriter:
    """Raw upstream SSE bytes in, the same events with keepstream ids out (events after
    ``skip`` only). Comments pass through (they keep connections alive)."""

    def __init__(self, stream_id: str, skip: int = 0, *, max_line_bytes: int = 1 << 20,
                 max_event_bytes: int = 8 << 20) -> None:
        self.stream_id = stream_id
        self.skip = skip
        self.seq = 0
        self._prefix = f"id: ks1.{stream_id}.".encode()
        self.overflowed = False
        self.parser = SSEParser(max_line_bytes=max_line_bytes, max_event_bytes=max_event_bytes)

    def feed(self, data: bytes) -> bytes:
        out = self._render(self.parser.feed(data))
        if self.parser.overflowed and not self.overflowed:
            # A line or event over the size caps: its events can no longer be re-identified.
            # Say so and let the caller end the response (never a silent gap).
            self.overflowed = True
            out += OVERFLOW_NOTE
        return out

    def _render(self, items: list[Event | Comment]) -> bytes:
        out: list[bytes] = []
        for item in items:
            if type(item) is Comment:
                if self.seq >= self.skip:
                    out.append(b":" + item.text.encode() + b"\n\n")
                continue
            assert isinstance(item, Event)
            self.seq += 1
            if self.seq <= self.skip:
                continue
            if item.event != "message":
                out.append(b"event: " + item.event.encode() + b"\n")
            out.extend(b"data: " + line.encode() + b"\n" for line in item.data.split("\n"))
            if item.retry is not None:
                out.append(b"retry: %d\n" % item.retry)
            out.append(self._prefix + str(self.seq).encode() + b"\n\n")
        return b"".join(out)

    @property
    def last_id(self) -> str | None:
        return ks_id(self.stream_id, self.seq) if self.seq else None


class EventSkipper:
    """Raw bytes in, raw bytes out, starting just after a resume point: the end of event
    ``after_seq`` or of the event whose upstream ``id`` is ``after_id``."""

    def __init__(self, *, after_seq: int | None = None, after_id: str | None = None) -> None:
        self.after_seq = after_seq
        self.after_id = after_id
        self.parser = SSEParser()
        self.found = after_seq == 0
        self._seen = 0
        self._fed = 0

    def feed(self, data: bytes) -> bytes:
        if self.found:
            return data
        base = self._fed
        self._fed += len(data)
        for item in self.parser.feed(data):
            if type(item) is not Event:
                continue
            assert isinstance(item, Event)
            self._seen += 1
            if (self.after_seq is not None and self._seen == self.after_seq) or \
                    (self.after_id is not None and item.id == self.after_id):
                self.found = True
                return data[item.end - base:]
        return b""


async def read_stream(
    sup: Supervisor, stream_id: str, offset: int = 0
) -> AsyncGenerator[bytes, None]:
    """Every body byte of a stream from ``offset``: the journal, then the live tail until the
    stream ends. Reading never slows the upstream or other readers (a reader behind the live
    buffer reads the journal)."""
    writer = sup.writer
    live = sup.live.get(stream_id)
    if live is None:
        while True:
            data = await writer.read_body(stream_id, offset, MAX_SEND)
            if not data:
                return
            offset += len(data)
            yield data
    sub = live.subscribe(offset)
    try:
        while True:
            try:
                data = live.read(sub)
            except Lagging:
                data = await writer.read_body(stream_id, sub.offset,
                                              min(live.base - sub.offset, MAX_SEND))
            if data:
                sub.offset += len(data)
                yield data
                continue
            if live.finished:
                return
            await live.wait_data(sub.offset)
    finally:
        live.unsubscribe(sub, client_left=False)
