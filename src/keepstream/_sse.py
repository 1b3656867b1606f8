"""Sans-IO parser for ``text/event-stream`` (WHATWG HTML, "Server-sent events", parsing rules).

Design rules (invariant I6 in DESIGN.md):

* Sans-IO. ``SSEParser.feed(bytes)`` returns the events and comments completed by those bytes;
  ``close()`` marks EOF. No I/O, no trio, no await, no clock: the caller owns the socket.
* Chunking never matters. Any split of the same byte stream (1-byte reads, a split inside CRLF,
  inside a multi-byte UTF-8 character, inside the BOM) yields the same list of events with the
  same ``end`` offsets. Nothing waits for a byte that may never come: a CR ends its line at
  once, and a LF that follows it (in this chunk or the next) is skipped.
* Byte-level parsing that equals the spec's decode-then-parse. The spec decodes the stream as
  UTF-8 (errors replaced by U+FFFD) and then splits on CR/LF and ``:``. Those are ASCII, and
  UTF-8 decoding resynchronises on every ASCII byte, so splitting the raw bytes first and
  decoding each complete value gives exactly the same text. A character split across chunks
  is therefore never decoded in halves: only complete lines are decoded.
* The UTF-8 BOM (EF BB BF) is stripped at stream offset 0 only; anywhere else it is data.
* Offsets are stream byte offsets, BOM bytes included. ``end`` is the offset just after the
  CR or LF that ended the dispatching blank line (or the comment line). For a CRLF pair that
  is just after the CR: the parser has to dispatch on the CR before it can know whether a LF
  follows, and ``end`` must not depend on chunking. The LF is then a skipped separator.
* At EOF an incomplete line and an undispatched event are discarded, as the spec says.
* Bounded memory. A line longer than ``max_line_bytes`` or an event whose data exceeds
  ``max_event_bytes`` sets ``overflowed``: the parser drops its buffers and from then on only
  counts ``offset``; ``feed()`` returns ``[]``. The proxy still forwards and journals the raw
  bytes itself; it just stops learning event boundaries.
* Hot path: lines are split with ``bytes.split``/``bytes.splitlines`` over a whole chunk (C
  speed), never byte by byte. A partial line is kept in one ``bytearray`` and only newly fed
  bytes are searched for a line end, so a long line fed in tiny pieces costs O(n), not O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Comment", "Event", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event."""

    data: str
    """The ``data`` lines joined with ``"\\n"``."""
    event: str
    """The event type; ``"message"`` when the block set none (or set it empty)."""
    id: str | None
    """The last-event-id buffer at dispatch (it persists across events); None if never set."""
    retry: int | None
    """The ``retry`` value given in this event's block, else None."""
    end: int
    """Stream byte offset just after the blank line that dispatched this event."""


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment line (``: text``); ``text`` is everything after the colon, unstripped."""

    text: str
    end: int
    """Stream byte offset just after the comment line's CR or LF."""


# Events are built on the hot path: set the slots directly instead of going through the frozen
# dataclass __init__ (object.__setattr__ per field), which costs about twice as much.
_EVENT_SLOTS = tuple(Event.__dict__[f].__set__ for f in ("data", "event", "id", "retry", "end"))


def _new_event(data: str, event: str, id: str | None, retry: int | None, end: int) -> Event:
    e = object.__new__(Event)
    set_data, set_event, set_id, set_retry, set_end = _EVENT_SLOTS
    set_data(e, data)
    set_event(e, event)
    set_id(e, id)
    set_retry(e, retry)
    set_end(e, end)
    return e


def _field(line: bytes, colon: int) -> tuple[bytes, bytes]:
    """A field line's name and value (one leading space of the value dropped); ``colon`` is
    ``line.find(b":")``, never 0 (a comment)."""
    if colon < 0:
        return line, b""
    start = colon + 1
    if line[start : start + 1] == b" ":
        start += 1
    return line[:colon], line[start:]


class SSEParser:
    """Incremental ``text/event-stream`` parser. Feed it bytes, get events."""

    __slots__ = (
        "_bom_pending",
        "_buf",
        "_buf_start",
        "_closed",
        "_data",
        "_data_bytes",
        "_event_type",
        "_max_event",
        "_max_line",
        "_offset",
        "_overflowed",
        "_retry",
        "_skip_lf",
        "boundary",
        "dispatched_id",
        "events",
        "last_id",
    )

    def __init__(self, *, max_line_bytes: int = 1 << 20, max_event_bytes: int = 8 << 20) -> None:
        if max_line_bytes < 1 or max_event_bytes < 1:
            raise ValueError("max_line_bytes and max_event_bytes must be >= 1")
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        self._buf = bytearray()  # the incomplete last line (never contains CR or LF)
        self._buf_start = 0  # stream offset of _buf[0]
        self._offset = 0
        self._bom_pending = True  # every byte so far is a proper prefix of the BOM
        self._skip_lf = False  # the last byte fed was a CR that ended a line
        self._overflowed = False
        self._closed = False
        self._data: list[bytes] = []  # data values of the current block
        self._data_bytes = 0
        self._event_type = ""
        self._retry: int | None = None
        #: Number of events dispatched so far.
        self.events = 0
        #: The last-event-id buffer: updated as soon as a valid ``id`` line is parsed.
        self.last_id: str | None = None
        #: The last-event-id of the last dispatched event (its ``Event.id``).
        self.dispatched_id: str | None = None
        #: Stream offset just after the last dispatched event or comment (the ``end`` of the
        #: last item :meth:`feed` returned); 0 before any.
        self.boundary = 0

    @property
    def overflowed(self) -> bool:
        """True once a line or an event exceeded its cap; parsing has stopped for good."""
        return self._overflowed

    @property
    def offset(self) -> int:
        """Total number of bytes fed so far."""
        return self._offset

    @property
    def buffered(self) -> int:
        """Bytes held for the incomplete line and the current event's data."""
        return len(self._buf) + self._data_bytes

    def feed(self, data: bytes) -> list[Event | Comment]:
        """Consume ``data``; return the events and comments it completed, in stream order."""
        prepared = self._prepare(data)
        if prepared is None:
            return []
        return self._parse(*prepared)

    def count(self, data: bytes) -> int:
        """Consume ``data`` like :meth:`feed`, but build nothing: only ``events``,
        ``last_id``, ``dispatched_id`` and ``boundary`` move (and the caps apply exactly as in
        :meth:`feed`). Returns the number of events ``data`` completed.

        The hot path of the proxy, which needs the count and the resume point but not the
        events themselves. Use one mode per parser: ``count`` keeps no data values, so a
        ``feed`` after a ``count`` would dispatch the block in progress without them.
        """
        # One whole ``data:`` event on a fresh line (the usual read of a paced stream): its
        # only LFs are the last two, so it is one data line and the blank line that dispatches
        # it. Nothing held back (no partial line, BOM or CR to look at), no cap within reach.
        # (``find`` stops at the first LF: a read of many events costs this test ~100 bytes.)
        if (
            data.endswith(b"\n\n")
            and data.startswith(b"data:")
            and data.find(b"\n") == len(data) - 2
            and b"\r" not in data
            and not self._buf
            and not (self._skip_lf or self._bom_pending or self._overflowed or self._closed)
            and len(data) <= self._max_line
            and len(data) + self._data_bytes <= self._max_event
        ):
            self._offset = self.boundary = self._offset + len(data)
            self.events += 1
            self.dispatched_id = self.last_id
            if self._data:
                self._data = []
            self._data_bytes = 0
            return 1
        prepared = self._prepare(data)
        if prepared is None:
            return 0
        return self._count(*prepared)

    def _prepare(self, data: bytes) -> tuple[bytes, int] | None:
        """BOM, a LF after a CR, and the held-back partial line: (bytes starting with a fresh
        line, their stream offset), or None when nothing is left to parse."""
        if self._closed:
            raise RuntimeError("SSEParser.feed() called after close()")
        start = self._offset  # stream offset of data[0]
        self._offset = start + len(data)
        if self._overflowed or not data:
            return None
        buf = self._buf
        if self._bom_pending:
            buf += data
            if len(buf) < 3 and _BOM.startswith(buf):
                return None  # still maybe a BOM; a BOM prefix holds no line end
            self._bom_pending = False
            data = bytes(buf)
            buf.clear()
            start = 0
            if data.startswith(_BOM):
                data = data[3:]
                start = 3
                if not data:
                    return None
        elif self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
                start += 1
                if not data:
                    return None
        if buf:
            if b"\n" not in data and b"\r" not in data:
                buf += data
                if len(buf) > self._max_line:
                    self._overflow()
                return None
            data = bytes(buf) + data
            start = self._buf_start
            buf.clear()
        return data, start

    def close(self) -> list[Event | Comment]:
        """Mark EOF. An incomplete line and an undispatched event are discarded (per spec)."""
        self._closed = True
        self._buf = bytearray()
        self._data = []
        self._data_bytes = 0
        return []

    def _overflow(self) -> None:
        self._overflowed = True
        self._buf = bytearray()
        self._data = []
        self._data_bytes = 0

    def _lines(self, chunk: bytes, pos: int) -> tuple[list[bytes], list[int] | None, bytes]:
        """Split ``chunk`` into complete lines (without their ends), the stream offset just
        after each line's end (None when every line ends in one LF: then the offsets follow
        from the lengths), and the incomplete last line."""
        if b"\r" not in chunk:
            contents = chunk.split(b"\n")
            return contents, None, contents.pop()
        lines = chunk.splitlines(True)
        last = lines[-1][-1]
        if last == _CR:
            self._skip_lf = True
            tail = b""
        elif last == _LF:
            tail = b""
        else:
            tail = lines.pop()
        contents = []
        ends = []
        for line in lines:
            pos += len(line)
            if line[-1] == _LF and len(line) > 1 and line[-2] == _CR:
                contents.append(line[:-2])
                ends.append(pos - 1)  # just after the CR: see the module docstring
            else:
                contents.append(line[:-1])
                ends.append(pos)
        return contents, ends, tail

    def _keep_tail(self, tail: bytes) -> None:
        if tail:
            if len(tail) > self._max_line:
                self._overflow()
            else:
                self._buf += tail
                self._buf_start = self._offset - len(tail)

    def _count_data_only(self, chunk: bytes, pos: int) -> int:
        """The common case in a few C-level passes, or -1 when it does not apply.

        Applies when ``chunk`` (starting on a fresh line) has only LF line ends, every complete
        line is a ``data:`` line or blank, no two blank lines follow each other, the first line
        is not blank, and no line or event can reach a cap within it. Then every blank line
        ends an event that has data, so the count is the number of blank lines.

        One equation checks the line rule: lines (``\n``) = ``data:`` lines + ``\n\n``
        (counted without overlap). A run of m >= 3 LFs holds m - 1 blank lines but only
        m // 2 such pairs, and any other line counts on the left only, so the equation
        fails on both (the left side is never the smaller). No pass of its own looks for a
        second blank line in a row, then: each pass over a 16 KiB read costs about 10 us."""
        if (
            b"\r" in chunk
            or chunk[:1] == b"\n"
            or len(chunk) > self._max_line
            or len(chunk) + self._data_bytes > self._max_event
        ):
            return -1
        last_nl = chunk.rfind(b"\n")
        if last_nl < 0:
            return -1
        complete = chunk[: last_nl + 1]
        lines = complete.count(b"\n")
        blanks = complete.count(b"\n\n")
        data_lines = complete.count(b"\ndata:") + complete.startswith(b"data:")
        if data_lines + blanks != lines:
            return -1
        last_blank = complete.rfind(b"\n\n")
        if last_blank >= 0:
            self.events += blanks
            self.dispatched_id = self.last_id
            self.boundary = pos + last_blank + 2
            pending = complete[last_blank + 2 :]
            data_bytes = 0
        else:
            pending = complete
            data_bytes = self._data_bytes
        if pending:
            k = pending.count(b"\n")
            spaces = pending.count(b"\ndata: ") + pending.startswith(b"data: ")
            data_bytes += len(pending) - 5 * k - spaces
        self._data = [b""] if pending or (last_blank < 0 and self._data) else []
        self._data_bytes = data_bytes
        self._keep_tail(chunk[last_nl + 1 :])
        return blanks

    def _count(self, chunk: bytes, pos: int) -> int:
        """:meth:`_parse`'s rules, counting instead of building (see :meth:`count`)."""
        n = self._count_data_only(chunk, pos)
        if n >= 0:
            return n
        contents, ends, tail = self._lines(chunk, pos)
        max_line = self._max_line
        max_event = self._max_event
        has_data = bool(self._data)
        data_bytes = self._data_bytes
        last_id = self.last_id
        dispatched_id = self.dispatched_id
        events = 0
        mark = -1  # index of the last line that ended an event or was a comment
        i = -1
        overflow = False
        for line in contents:
            i += 1
            if not line:
                if has_data:
                    events += 1
                    dispatched_id = last_id
                    mark = i
                    has_data = False
                    data_bytes = 0
                continue
            if len(line) > max_line:
                overflow = True
                break
            if line.startswith(b"data:"):
                data_bytes += len(line) - (5 if line[5:6] == b" " else 4)
            else:
                colon = line.find(b":")
                if colon == 0:
                    mark = i
                    continue
                name, value = _field(line, colon)
                if name == b"id":
                    if b"\x00" not in value:
                        last_id = value.decode("utf-8", "replace")
                    continue
                if name != b"data":
                    continue  # event, retry and unknown fields do not matter here
                data_bytes += len(value) + 1
            has_data = True
            if data_bytes > max_event:
                overflow = True
                break
        self.events += events
        self.last_id = last_id
        self.dispatched_id = dispatched_id
        if mark >= 0:
            if ends is None:
                self.boundary = pos + sum(map(len, contents[: mark + 1])) + mark + 1
            else:
                self.boundary = ends[mark]
        if overflow:
            self._overflow()
            return events
        # The block in progress: count mode keeps no values, only that there is data.
        self._data = [b""] if has_data else []
        self._data_bytes = data_bytes
        self._keep_tail(tail)
        return events

    def _parse(self, chunk: bytes, pos: int) -> list[Event | Comment]:
        """Parse ``chunk`` (which starts at stream offset ``pos`` with a fresh line)."""
        contents, ends, tail = self._lines(chunk, pos)
        out: list[Event | Comment] = []
        max_line = self._max_line
        max_event = self._max_event
        data = self._data
        data_bytes = self._data_bytes
        event_type = self._event_type
        retry = self._retry
        end = pos
        i = -1
        for line in contents:
            i += 1
            if ends is None:
                end += len(line) + 1
            else:
                end = ends[i]
            if not line:
                # Blank line: dispatch.
                if data:
                    self.events += 1
                    self.dispatched_id = self.last_id
                    out.append(
                        _new_event(
                            b"\n".join(data).decode("utf-8", "replace"),
                            event_type or "message",
                            self.last_id,
                            retry,
                            end,
                        )
                    )
                    data.clear()
                    data_bytes = 0
                event_type = ""
                retry = None
                continue
            if len(line) > max_line:
                self._overflow()
                break
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
            else:
                colon = line.find(b":")
                if colon == 0:
                    out.append(Comment(line[1:].decode("utf-8", "replace"), end))
                    continue
                name, value = _field(line, colon)
                if name == b"event":
                    event_type = value.decode("utf-8", "replace")
                    continue
                if name == b"id":
                    if b"\x00" not in value:
                        self.last_id = value.decode("utf-8", "replace")
                    continue
                if name == b"retry":
                    # bytes.isdigit(): ASCII digits only, non-empty. More than 18 digits
                    # cannot be a reconnection time; ignored (and never a huge int()).
                    if value.isdigit() and len(value) <= 18:
                        retry = int(value)
                    continue
                if name != b"data":
                    continue  # unknown field: ignored
            data.append(value)
            data_bytes += len(value) + 1
            if data_bytes > max_event:
                self._overflow()
                break
        else:
            self._data_bytes = data_bytes
            self._event_type = event_type
            self._retry = retry
            self._keep_tail(tail)
        if out:
            self.boundary = out[-1].end
        return out
