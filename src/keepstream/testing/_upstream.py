"""A scriptable HTTP/1.1 origin for tests: :class:`FakeUpstream`.

One fake upstream serves every test: each request picks its own behaviour with ``X-Fake-*``
request headers, parsed into a :class:`FakeResponseSpec`. Requests are parsed with h11; responses
are written by hand as bytes, so faults in the middle of a body (a reset after exactly ``k`` body
bytes, a clean cut, a stall, a malformed stream) are possible.

Headers (all optional, case-insensitive names)::

    X-Fake-Events: N          SSE events (default 5)
    X-Fake-Event-Size: B      wire bytes per event (default 100; exact unless too small)
    X-Fake-Interval: S        seconds between events (default 0)
    X-Fake-Style: llm|plain|chunked
                              llm: OpenAI-like deltas then "data: [DONE]";
                              plain: "id/event/data" events; chunked: arbitrary octets
    X-Fake-Framing: chunked|length|close
                              one HTTP chunk per event (default) / Content-Length / EOF-delimited
    X-Fake-Delay-Headers: S   sleep before the status line
    X-Fake-Never-Answer: 1    read the request, never answer, hold the connection
    X-Fake-Stall-After: N     send N events, then go silent and hold the connection
    X-Fake-Heartbeat: S       while stalled, send ": ping\\n\\n" every S seconds
    X-Fake-Reset-After: K     send exactly K body bytes, then RST (SO_LINGER 0)
    X-Fake-Cut-After: K       send exactly K body bytes, then a clean FIN
    X-Fake-Status: CODE       status code (the body is still produced)
    X-Fake-Retry-After: V     echoed as Retry-After
    X-Fake-Malformed: 1       BOM, mixed CR / LF / CRLF line ends, invalid UTF-8
    X-Fake-Huge-Line: B       end the body with one B-byte "data: xxx..." line without newline,
                              then close the connection
    X-Fake-Slow-Close: S      after the last byte (incl. the 0-chunk) wait S s, then close
                              (no Connection: close is announced; a request sent on the
                              connection meanwhile is not answered)
    X-Fake-Redirect: URL      answer 302 with Location: URL and an empty body
    X-Fake-Seed: N            seed for the filler bytes (deterministic without it too)
    X-Fake-On-Eof: close|continue
                              what a client's EOF (FIN) means while answering: "close" (default)
                              treats it as the client leaving; "continue" keeps writing
                              (a half-closed client still reads)

``POST /echo`` (any method, path ``/echo``) answers 200 with the request body byte for byte and
the request's Content-Type (``application/json`` when it had none).

Every request is recorded as an :class:`UpstreamExchange` with the exact de-chunked body bytes
written and the timing of the connection's end, including a client that leaves while the upstream
is pacing or stalled (a reader task watches the socket during the whole answer).

Connection semantics: keep-alive between requests unless the request asks for ``close``, the
framing is ``close``, or a fault or slow close ends the connection. A client's EOF while idle ends
the connection.
"""

from __future__ import annotations

import http
import random
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

import h11
import trio

__all__ = [
    "FakeResponseSpec",
    "FakeUpstream",
    "UpstreamExchange",
    "run_fake_upstream",
    "sse_body",
]

Style = Literal["llm", "plain", "chunked"]
Framing = Literal["chunked", "length", "close"]
HeaderInput = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
_OCTETS = bytes(range(256))
_BOM = b"\xef\xbb\xbf"
_INVALID_UTF8 = b"\xc3\x28\xff\xfe"
_HEARTBEAT = b": ping\n\n"
_LLM_PREFIX = b'data: {"choices":[{"delta":{"content":"'
_LLM_SUFFIX = b'"}}]}\n\n'
_LLM_DONE = b"data: [DONE]\n\n"
_READ_SIZE = 65536
_MAX_HEAD = 1 << 20
# Linux SIOCOUTQNSD: bytes in the send queue not yet sent to the peer.
_SIOCOUTQNSD = 0x894B
_DRAIN_LIMIT = 5.0


def _pattern(alphabet: bytes, n: int, start: int) -> bytes:
    if n <= 0:
        return b""
    start %= len(alphabet)
    rotated = alphabet[start:] + alphabet[:start]
    return (rotated * (n // len(rotated) + 1))[:n]


def _filler(n: int, index: int, rng: random.Random | None) -> bytes:
    if n <= 0:
        return b""
    if rng is None:
        return _pattern(_ALPHABET, n, index)
    return bytes(rng.choices(_ALPHABET, k=n))


def _event(style: Style, index: int, size: int, rng: random.Random | None) -> bytes:
    if style == "llm":
        base = f"tok{index} ".encode()
        pad = size - len(_LLM_PREFIX) - len(_LLM_SUFFIX) - len(base)
        return _LLM_PREFIX + base + _filler(pad, index, rng) + _LLM_SUFFIX
    if style == "plain":
        head = f"id: {index}\nevent: tick\ndata: ".encode()
        base = f"tick {index} ".encode()
        pad = size - len(head) - len(base) - 2
        return head + base + _filler(pad, index, rng) + b"\n\n"
    if rng is not None:
        return rng.randbytes(max(size, 0))
    return _pattern(_OCTETS, size, index)


def _malform(event: bytes, index: int) -> bytes:
    ending = (b"\n", b"\r", b"\r\n")[index % 3]
    return event.replace(b"\n", ending)


def _body_parts(
    *,
    events: int,
    style: Style,
    size: int,
    seed: int | None,
    malformed: bool,
    huge_line: int | None,
) -> list[bytes]:
    rng = random.Random(seed) if seed is not None else None
    parts: list[bytes] = []
    bad_index = min(1, events - 1)
    for i in range(events):
        event = _event(style, i, size, rng)
        if malformed:
            if i == bad_index:
                cut = len(_LLM_PREFIX) if style == "llm" else 0
                if style == "plain":
                    cut = event.index(b"data: ") + len(b"data: ")
                event = event[:cut] + _INVALID_UTF8 + event[cut:]
            if style != "chunked":
                event = _malform(event, i)
        parts.append(event)
    if style == "llm" and huge_line is None:
        parts.append(_malform(_LLM_DONE, events) if malformed else _LLM_DONE)
    if huge_line is not None:
        parts.append((b"data: " + _pattern(b"x", huge_line, 0))[:huge_line])
    if malformed:
        if parts:
            parts[0] = _BOM + parts[0]
        else:
            parts.append(_BOM)
    return parts


def sse_body(
    n_events: int = 5,
    style: Style = "llm",
    size: int = 100,
    *,
    seed: int | None = None,
    malformed: bool = False,
    huge_line: int | None = None,
) -> bytes:
    """Return the full body the fake upstream produces for these settings.

    Deterministic: the same arguments always give the same bytes. ``size`` is the exact wire
    length of each event unless it is smaller than the event's fixed parts (or ``malformed`` adds
    bytes). The ``llm`` style ends with ``data: [DONE]`` (not counted in ``n_events``).
    """
    return b"".join(
        _body_parts(
            events=n_events,
            style=style,
            size=size,
            seed=seed,
            malformed=malformed,
            huge_line=huge_line,
        )
    )


def _normalize_headers(headers: HeaderInput) -> dict[str, str]:
    items: Iterable[tuple[str | bytes, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        val = value.decode("latin-1") if isinstance(value, bytes) else value
        out[key.strip().lower()] = val.strip()
    return out


def _flag(value: str) -> bool:
    return value.lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class FakeResponseSpec:
    """How the fake upstream answers one request; built from ``X-Fake-*`` request headers.

    Build one in a test and send :meth:`headers` with the request, then compare against
    :meth:`expected_body` (or :meth:`expected_parts`, the units written one per event).
    """

    events: int = 5
    event_size: int = 100
    interval: float = 0.0
    style: Style = "llm"
    framing: Framing = "chunked"
    delay_headers: float = 0.0
    never_answer: bool = False
    stall_after: int | None = None
    heartbeat: float | None = None
    reset_after: int | None = None
    cut_after: int | None = None
    status: int = 200
    retry_after: str | None = None
    malformed: bool = False
    huge_line: int | None = None
    slow_close: float = 0.0
    redirect: str | None = None
    seed: int | None = None
    on_eof: Literal["close", "continue"] = "close"

    @classmethod
    def from_headers(cls, headers: HeaderInput) -> FakeResponseSpec:
        """Parse the ``X-Fake-*`` headers; raise ``ValueError`` on a bad value."""
        h = _normalize_headers(headers)

        def get(name: str) -> str | None:
            return h.get("x-fake-" + name)

        def opt_int(name: str) -> int | None:
            v = get(name)
            return None if v is None else int(v)

        def opt_float(name: str) -> float | None:
            v = get(name)
            return None if v is None else float(v)

        style = get("style") or "llm"
        if style not in ("llm", "plain", "chunked"):
            raise ValueError(f"X-Fake-Style: unknown style {style!r}")
        framing = get("framing") or "chunked"
        if framing not in ("chunked", "length", "close"):
            raise ValueError(f"X-Fake-Framing: unknown framing {framing!r}")
        on_eof = get("on-eof") or "close"
        if on_eof not in ("close", "continue"):
            raise ValueError(f"X-Fake-On-Eof: unknown value {on_eof!r}")
        events = opt_int("events")
        event_size = opt_int("event-size")
        spec = cls(
            events=5 if events is None else events,
            event_size=100 if event_size is None else event_size,
            interval=opt_float("interval") or 0.0,
            style=style,  # type: ignore[arg-type]
            framing=framing,  # type: ignore[arg-type]
            delay_headers=opt_float("delay-headers") or 0.0,
            never_answer=_flag(get("never-answer") or "0"),
            stall_after=opt_int("stall-after"),
            heartbeat=opt_float("heartbeat"),
            reset_after=opt_int("reset-after"),
            cut_after=opt_int("cut-after"),
            status=opt_int("status") or 200,
            retry_after=get("retry-after"),
            malformed=_flag(get("malformed") or "0"),
            huge_line=opt_int("huge-line"),
            slow_close=opt_float("slow-close") or 0.0,
            redirect=get("redirect"),
            seed=opt_int("seed"),
            on_eof=on_eof,  # type: ignore[arg-type]
        )
        spec._validate()
        return spec

    def _validate(self) -> None:
        for name in ("events", "event_size", "stall_after", "reset_after", "cut_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.huge_line is not None and self.huge_line < 1:
            raise ValueError("huge_line must be >= 1")
        if self.heartbeat is not None and self.heartbeat <= 0:
            raise ValueError("heartbeat must be > 0")
        if not 100 <= self.status <= 999:
            raise ValueError("status must be a 3-digit code")
        if min(self.interval, self.delay_headers, self.slow_close) < 0:
            raise ValueError("times must be >= 0")

    def headers(self) -> list[tuple[str, str]]:
        """Return the ``X-Fake-*`` request headers that select this spec (non-defaults only)."""
        default = FakeResponseSpec()
        out: list[tuple[str, str]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            name = "X-Fake-" + "-".join(p.capitalize() for p in f.name.split("_"))
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, float):
                text = repr(value)
            else:
                text = str(value)
            out.append((name, text))
        return out

    def expected_parts(self) -> list[bytes]:
        """The body as written: one entry per event (plus ``[DONE]`` / the huge line)."""
        return _body_parts(
            events=self.events,
            style=self.style,
            size=self.event_size,
            seed=self.seed,
            malformed=self.malformed,
            huge_line=self.huge_line,
        )

    def expected_body(self) -> bytes:
        """The complete body this spec produces (before any reset, cut or stall)."""
        if self.redirect is not None:
            return b""
        return b"".join(self.expected_parts())

    @property
    def content_type(self) -> str:
        """The Content-Type of the answer."""
        return "application/octet-stream" if self.style == "chunked" else "text/event-stream"


@dataclass
class UpstreamExchange:
    """One request the fake upstream received, and what it sent back.

    Times are ``trio.current_time()``. ``closed_at`` is when this side saw the connection end
    (the peer closed or reset it, or the upstream closed it); on a kept-alive connection it is set
    when the connection finally ends. ``peer_closed_first`` is True when the client closed or
    reset the connection before the upstream finished writing the answer. ``done`` is set when
    handling of this request ends (after the last byte on a kept-alive connection, else after the
    close).

    Also: ``status`` sent; ``finished_writing`` (the whole answer, end of body included, was
    written); ``peer_eof_at`` (a FIN from the client was seen); ``peer_reset`` (the client reset
    the connection); ``reset_sent`` (the upstream closed with an RST); ``index`` in
    ``FakeUpstream.exchanges``, also sent as the ``X-Fake-Exchange`` response header.
    """

    request_method: str
    request_target: str
    request_headers: list[tuple[bytes, bytes]]
    request_body: bytes
    body_sent: bytearray = field(default_factory=bytearray)
    started_at: float = 0.0
    headers_sent_at: float | None = None
    last_byte_at: float | None = None
    closed_at: float | None = None
    peer_closed_first: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None
    finished_writing: bool = False
    peer_eof_at: float | None = None
    peer_reset: bool = False
    reset_sent: bool = False
    index: int = 0

    def header(self, name: str) -> str | None:
        """Return the first request header ``name`` (case-insensitive) as text, or None."""
        key = name.lower().encode("latin-1")
        for k, v in self.request_headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


class _Conn:
    """Per-connection state shared by the request loop and the watcher."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.last: UpstreamExchange | None = None
        self.gone = False  # the peer closed or reset the connection
        self.closed = False  # we closed the socket


def _set_linger_zero(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _unsent_bytes(sock: trio.socket.SocketType) -> int | None:
    if sys.platform != "linux":
        return None
    import fcntl

    try:
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except OSError:
        return None
    return int(struct.unpack("i", raw)[0])


async def _wait_sent(sock: trio.socket.SocketType) -> None:
    """Wait (bounded) until the kernel has sent everything we wrote, so an RST drops nothing."""
    with trio.move_on_after(_DRAIN_LIMIT):
        while True:
            unsent = _unsent_bytes(sock)
            if unsent is None:
                await trio.sleep(0.02)
                return
            if unsent == 0:
                return
            await trio.sleep(0.001)


class _Writer:
    """Buffers one answer's bytes, applies the framing and the reset/cut byte budget."""

    def __init__(
        self, stream: trio.SocketStream, ex: UpstreamExchange, framing: Framing, budget: int | None
    ) -> None:
        self.stream = stream
        self.ex = ex
        self.framing = framing
        self.budget = budget
        self.buf = bytearray()
        self.pending_body = bytearray()
        self.head_pending = False

    def head(self, data: bytes) -> None:
        self.buf += data
        self.head_pending = True

    def body(self, data: bytes) -> bool:
        """Queue body bytes; return False when the fault budget ran out (queued up to it)."""
        if not data:
            return True
        take = data
        if self.budget is not None:
            if self.budget <= 0:
                return False
            take = data[: self.budget]
            self.budget -= len(take)
        if self.framing == "chunked":
            self.buf += b"%x\r\n" % len(data)
            self.buf += take
            if len(take) == len(data):
                self.buf += b"\r\n"
        else:
            self.buf += take
        self.pending_body += take
        return len(take) == len(data) and (self.budget is None or self.budget > 0)

    def end(self) -> None:
        if self.framing == "chunked":
            self.buf += b"0\r\n\r\n"

    async def flush(self) -> None:
        if not self.buf:
            return
        data = bytes(self.buf)
        self.buf.clear()
        await self.stream.send_all(data)
        now = trio.current_time()
        if self.head_pending:
            self.head_pending = False
            self.ex.headers_sent_at = now
        if self.pending_body:
            self.ex.body_sent += self.pending_body
            self.pending_body.clear()
        self.ex.last_byte_at = now


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


def _wants_close(request: h11.Request) -> bool:
    tokens: set[bytes] = set()
    for name, value in request.headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if request.http_version == b"1.0":
        return b"keep-alive" not in tokens
    return b"close" in tokens


class FakeUpstream:
    """A running fake upstream; get one from ``await nursery.start(run_fake_upstream)``.

    ``url`` is ``"http://127.0.0.1:PORT"``. ``exchanges`` lists every request in arrival order;
    ``connections_seen`` counts accepted TCP connections; :meth:`open_connections` counts those
    still open.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.exchanges: list[UpstreamExchange] = []
        self.connections_seen = 0
        self._open = 0
        self._changed = trio.Event()

    @staticmethod
    def spec_for(headers: HeaderInput) -> FakeResponseSpec:
        """Parse request headers into the :class:`FakeResponseSpec` the upstream would use."""
        return FakeResponseSpec.from_headers(headers)

    @staticmethod
    def expected_body(headers: HeaderInput) -> bytes:
        """The complete body the upstream produces for a request with these headers."""
        return FakeResponseSpec.from_headers(headers).expected_body()

    @staticmethod
    def expected_events(headers: HeaderInput) -> list[bytes]:
        """The body for these headers split as written (one entry per event)."""
        return FakeResponseSpec.from_headers(headers).expected_parts()

    def open_connections(self) -> int:
        """Number of TCP connections currently open on the upstream side."""
        return self._open

    async def wait_exchanges(self, n: int) -> None:
        """Wait until at least ``n`` requests have arrived."""
        while len(self.exchanges) < n:
            await self._changed.wait()

    async def wait_connections_closed(self) -> None:
        """Wait until no TCP connection is open (polls every millisecond)."""
        while self._open:
            await trio.sleep(0.001)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- connection handling ------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        self.connections_seen += 1
        self._open += 1
        conn = _Conn(stream)
        try:
            while not conn.gone and not conn.closed:
                request = await self._read_request(conn)
                if request is None:
                    break
                keep = await self._exchange(conn, *request)
                if not keep:
                    break
        finally:
            self._open -= 1
            ex = conn.last
            if ex is not None and ex.closed_at is None:
                ex.closed_at = trio.current_time()
            if not conn.closed:
                conn.closed = True
                stream.socket.close()
            if ex is not None:
                ex.done.set()
            self._notify()

    async def _receive(self, conn: _Conn) -> bytes | None:
        """Receive bytes; None when the peer closed or reset the connection."""
        try:
            data = await conn.stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return data or None

    async def _read_request(self, conn: _Conn) -> tuple[h11.Request, bytes, float] | None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        if conn.buffer:
            parser.receive_data(bytes(conn.buffer))
            conn.buffer.clear()
        request: h11.Request | None = None
        started = 0.0
        body = bytearray()
        sent_continue = False
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                await self._bad_request(conn, str(exc))
                return None
            if event is h11.NEED_DATA:
                if (
                    request is not None
                    and not sent_continue
                    and parser.they_are_waiting_for_100_continue
                ):
                    sent_continue = True
                    try:
                        await conn.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except trio.BrokenResourceError:
                        return None
                data = await self._receive(conn)
                if data is None:
                    if conn.last is not None and conn.last.closed_at is None:
                        conn.last.closed_at = trio.current_time()
                    conn.gone = True
                    return None
                parser.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                started = trio.current_time()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                conn.buffer += parser.trailing_data[0]
                return request, bytes(body), started
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - NEED_DATA path
                return None

    async def _bad_request(self, conn: _Conn, message: str) -> None:
        body = message.encode("utf-8", "replace")
        head = (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        try:
            await conn.stream.send_all(head + body)
        except trio.BrokenResourceError:
            pass

    async def _exchange(
        self, conn: _Conn, request: h11.Request, body: bytes, started: float
    ) -> bool:
        ex = UpstreamExchange(
            request_method=request.method.decode("latin-1"),
            request_target=request.target.decode("latin-1"),
            request_headers=list(request.headers.raw_items()),
            request_body=body,
            started_at=started,
            index=len(self.exchanges),
        )
        prev = conn.last
        conn.last = ex
        if prev is not None:
            prev.done.set()
        self.exchanges.append(ex)
        self._notify()

        try:
            spec = FakeResponseSpec.from_headers(ex.request_headers)
        except ValueError as exc:
            await self._bad_request(conn, str(exc))
            ex.status = 400
            return False

        keep = False
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, conn, ex, spec, scope)
            with scope:
                try:
                    keep = await self._respond(conn, ex, spec, request)
                except trio.BrokenResourceError as exc:
                    ex.peer_reset = isinstance(exc.__cause__, ConnectionResetError)
                    if ex.closed_at is None:
                        ex.closed_at = trio.current_time()
                    ex.peer_closed_first = not ex.finished_writing
                    conn.gone = True
            nursery.cancel_scope.cancel()
        if conn.gone or conn.closed:
            return False
        if keep and ex.finished_writing:
            ex.done.set()
        return keep and ex.finished_writing and not _wants_close(request)

    async def _watch(
        self, conn: _Conn, ex: UpstreamExchange, spec: FakeResponseSpec, scope: trio.CancelScope
    ) -> None:
        """Watch the socket while answering: a client leaving is seen at once, even mid-sleep."""
        while True:
            try:
                data = await conn.stream.receive_some(_READ_SIZE)
            except trio.ClosedResourceError:
                return  # we closed the socket ourselves (a fault or a slow close ended)
            except trio.BrokenResourceError as exc:
                data = None
                ex.peer_reset = isinstance(exc.__cause__, ConnectionResetError)
            if data:
                conn.buffer += data
                continue
            now = trio.current_time()
            if data == b"":
                ex.peer_eof_at = now
                if spec.on_eof == "continue":
                    return
            if ex.closed_at is None:
                ex.closed_at = now
            ex.peer_closed_first = not ex.finished_writing
            conn.gone = True
            scope.cancel()
            return

    async def _close(self, conn: _Conn, ex: UpstreamExchange, *, reset: bool) -> None:
        if reset:
            await _wait_sent(conn.stream.socket)
            _set_linger_zero(conn.stream.socket)
            ex.reset_sent = True
        conn.closed = True
        conn.stream.socket.close()
        if ex.closed_at is None:
            ex.closed_at = trio.current_time()

    async def _respond(
        self, conn: _Conn, ex: UpstreamExchange, spec: FakeResponseSpec, request: h11.Request
    ) -> bool:
        stream = conn.stream
        if spec.delay_headers:
            await trio.sleep(spec.delay_headers)
        if spec.never_answer:
            await trio.sleep_forever()

        if ex.request_target.split("?", 1)[0] == "/echo":
            ctype = ex.header("content-type") or "application/json"
            head = (
                _status_line(200)
                + f"Content-Type: {ctype}\r\nContent-Length: {len(ex.request_body)}\r\n".encode(
                    "latin-1"
                )
                + f"X-Fake-Exchange: {ex.index}\r\n\r\n".encode()
            )
            writer = _Writer(stream, ex, "length", None)
            writer.head(head)
            writer.body(ex.request_body)
            ex.status = 200
            await writer.flush()
            ex.finished_writing = True
            return True

        if spec.redirect is not None:
            head = (
                _status_line(302)
                + f"Location: {spec.redirect}\r\nContent-Length: 0\r\n".encode("latin-1")
                + f"X-Fake-Exchange: {ex.index}\r\n\r\n".encode()
            )
            writer = _Writer(stream, ex, "length", None)
            writer.head(head)
            ex.status = 302
            await writer.flush()
            ex.finished_writing = True
            return True

        parts = [] if request.method == b"HEAD" else spec.expected_parts()
        closing = spec.framing == "close" or spec.huge_line is not None or _wants_close(request)
        lines = [f"Content-Type: {spec.content_type}", "Cache-Control: no-cache"]
        if spec.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif spec.framing == "length":
            lines.append(f"Content-Length: {sum(len(p) for p in spec.expected_parts())}")
        if spec.retry_after is not None:
            lines.append(f"Retry-After: {spec.retry_after}")
        if closing:
            lines.append("Connection: close")
        lines.append(f"X-Fake-Exchange: {ex.index}")
        head = (
            _status_line(spec.status)
            + "".join(f"{line}\r\n" for line in lines).encode("latin-1")
            + b"\r\n"
        )

        budget = spec.reset_after if spec.reset_after is not None else spec.cut_after
        faulty = budget is not None
        writer = _Writer(stream, ex, spec.framing, budget)
        writer.head(head)
        ex.status = spec.status

        async def fault() -> bool:
            await writer.flush()
            await self._close(conn, ex, reset=spec.reset_after is not None)
            return False

        async def stall() -> bool:
            await writer.flush()
            if spec.heartbeat is None:
                await trio.sleep_forever()
            while True:
                await trio.sleep(spec.heartbeat)
                if not writer.body(_HEARTBEAT):
                    return await fault()
                await writer.flush()

        if faulty and budget == 0:
            return await fault()
        for i, part in enumerate(parts):
            if spec.stall_after is not None and i >= spec.stall_after:
                return await stall()
            if i > 0 and spec.interval > 0:
                await writer.flush()
                await trio.sleep(spec.interval)
            if not writer.body(part):
                return await fault()
        if spec.stall_after is not None:  # stall_after >= len(parts): stall before the end
            return await stall()
        if faulty:
            # The whole body fit in the budget: the fault still ends the response early,
            # before the end-of-body framing.
            return await fault()
        if request.method != b"HEAD":
            writer.end()
        await writer.flush()
        ex.finished_writing = True
        if spec.slow_close > 0:
            await trio.sleep(spec.slow_close)
            await self._close(conn, ex, reset=False)
            return False
        if closing:
            await self._close(conn, ex, reset=False)
            return False
        return True


async def run_fake_upstream(
    *, task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve a :class:`FakeUpstream` on ``127.0.0.1`` (a free port) until cancelled.

    Start it with ``upstream = await nursery.start(run_fake_upstream)``; cancelling the nursery
    stops it and closes every connection.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    upstream = FakeUpstream(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, upstream._serve_connection, listeners)
        task_status.started(upstream)
