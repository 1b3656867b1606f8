"""A lean HTTP/1.1 transport for the upstream side, behind httpx's transport interface.

Why: keepstream forwards many small upstream chunks (an SSE event is often one HTTP chunk).
Through httpx's default transport every chunk climbs about six async-generator layers (httpx ->
httpcore -> h11) and every socket read runs under its own ``fail_after`` scope and two scheduler
passes; profiled under keepstream's paced benchmark that path was a third of the proxy's CPU.
This transport reads the socket in large pieces (up to ``READ_SIZE``) and decodes the chunked
framing of everything a piece holds in one pass, so a piece carrying 600 events costs one
iteration, not 600. httpx stays the client API: ``httpx.AsyncClient(transport=FastTransport())``.

Scope, on purpose small:

* ``http://`` only, HTTP/1.1 with keep-alive. Any other scheme goes to ``fallback`` (httpx's own
  transport), so ``https://`` routes keep working unchanged.
* Response framing as RFC 9112 section 6.3: no body for ``HEAD``, 1xx, 204 and 304; chunked
  when ``chunked`` is the final transfer coding; else read-until-close when any other
  Transfer-Encoding is present; else Content-Length (several values must agree); else
  read-until-close. Informational responses (100, 103) before the final one are skipped; 101
  is a protocol error (keepstream never asks for an upgrade).
* Strict where framing is concerned: a malformed status line, header line, chunk size or
  Content-Length, an obs-fold, a head over ``MAX_HEAD`` bytes, or a body cut short raises
  ``httpx.RemoteProtocolError``; socket errors become ``httpx.ReadError``/``WriteError``. The
  bytes decoded before the error are always yielded first, so a stream reset after k bytes
  has exactly those k bytes.
* Timeouts: ``connect``, ``pool``, ``read`` and ``write`` from the request's ``timeout``
  extension (None means none: keepstream runs its own deadlines as cancel scopes).
* Cancellation: a cancelled request or an early ``aclose()`` closes the socket at once
  (synchronously, so a cancelled caller cannot skip it); only a connection whose response was
  read to its end, framed by length or chunks, without ``Connection: close``, is kept alive.
* Pool: at most ``max_connections`` (waiting up to the ``pool`` timeout, then
  ``httpx.PoolTimeout``), at most ``max_keepalive`` idle ones, each for ``keepalive_expiry``
  seconds; an idle connection that became readable (the peer closed it) is never reused.

Resources: the transport owns its sockets; ``aclose()`` closes every idle one. A response's
socket belongs to its stream until the stream ends or is closed.
"""

from __future__ import annotations

import errno
import re
import socket
import time
from collections.abc import AsyncIterator
from itertools import repeat
from typing import Any

import httpx
import trio

__all__ = ["FastTransport"]

#: Bytes asked of one ``recv()``: enough for about 150 small SSE events per read, small enough
#: that the live buffer (trimmed in whole pieces) stays close to ``stream_buffer_bytes``.
READ_SIZE = 16 * 1024
#: Largest response head (status line and headers).
MAX_HEAD = 64 * 1024
#: Largest chunk-size line (with extensions) or trailer line, CRLF included.
MAX_CHUNK_LINE = 4 * 1024
#: Largest trailer section (its field lines with their CRLFs, and the final CRLF). Without it
#: an upstream sending trailer lines without end would hold a body open for ever. 16 KiB is
#: h11's default cap on an incomplete event (httpx's default transport, through httpcore,
#: allows 100 KiB); keepstream drops trailers, so refusing more costs nothing it uses.
MAX_TRAILERS = 4 * MAX_CHUNK_LINE

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_HEXDIGITS = b"0123456789abcdefABCDEF"
#: Most IP-literal upstream addresses kept resolved (``FastTransport._connect``).
ADDR_CACHE_SIZE = 256
#: A trailer field line: a token, ":", then no control character but HTAB (OWS included).
_FIELD_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*")
#: Bytes left in a read below which the general loop finishes it (no fast-path attempt).
_FAST_MIN = 512
#: Smallest chunk the equal-size run path takes (``_ChunkedDecoder._uniform_run``): below it
#: the chunk separator could also be read inside a chunk's data, and a per-chunk split costs
#: little more anyway.
_UNIFORM_MIN = 32


class _Conn:
    """One upstream connection: a non-blocking stdlib socket driven with trio's I/O waits."""

    __slots__ = ("drained", "idle_since", "key", "sock")

    def __init__(self, sock: socket.socket, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key
        self.idle_since = 0.0
        self.drained = False  # the last read took less than READ_SIZE

    def _read(self) -> bytes:
        # Into one shared buffer, then copied out at its exact size: ``recv(n)`` would
        # allocate n bytes per read and shrink them, which fragments the heap when many
        # streams keep their reads alive in live buffers.
        n = self.sock.recv_into(_READ_BUF)
        self.drained = n < READ_SIZE
        return _READ_VIEW[:n].tobytes()

    def close(self) -> None:
        sock = self.sock
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def stale(self) -> bool:
        """True when the peer closed (or sent something unasked) while the connection idled."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    async def send_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        sock = self.sock
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                with trio.move_on_at(deadline) as cs:
                    await trio.lowlevel.wait_writable(sock)
                if cs.cancelled_caught:
                    raise httpx.WriteTimeout("upstream write timed out") from None
                continue
            except OSError as exc:
                raise httpx.WriteError(f"upstream write failed: {exc}") from exc
            view = view[sent:]

    async def recv(self, deadline: float) -> bytes:
        """The next bytes (b"" at EOF). A checkpoint, as trio's own socket reads: it raises
        ``Cancelled`` if cancelled, and yields to the scheduler once, in the I/O wait or after
        a read that did not have to wait."""
        sock = self.sock
        if not self.drained:
            # The last read filled the buffer: more is likely waiting, read before waiting.
            # After a short read the socket is most likely empty: wait first, which saves a
            # read that would fail with EAGAIN (one system call per event in a paced stream).
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = self._read()
            except BlockingIOError:
                pass
            except OSError as exc:
                raise httpx.ReadError(f"upstream read failed: {exc}") from exc
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            if deadline == _INF:
                await trio.lowlevel.wait_readable(sock)
            else:
                with trio.move_on_at(deadline) as cs:
                    await trio.lowlevel.wait_readable(sock)
                if cs.cancelled_caught:
                    raise httpx.ReadTimeout("upstream read timed out")
            try:
                return self._read()
            except BlockingIOError:
                continue
            except OSError as exc:
                raise httpx.ReadError(f"upstream read failed: {exc}") from exc


_INF = float("inf")

#: The response extension that holds the body stream itself (a ``_Body``): keepstream's stream
#: task iterates it directly rather than through ``Response.aiter_raw()``, which adds two
#: generators per chunk (httpx's own and the client's ``BoundAsyncStream``). Closing the
#: response still closes it.
RAW_BODY = "keepstream.raw_body"
# One read buffer for the process: trio runs one task at a time, and a read is copied out of
# it before anything awaits.
_READ_BUF = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUF)


def _deadline(timeout: Any) -> float:
    return _INF if timeout is None else trio.current_time() + float(timeout)


class _ChunkedDecoder:
    """Sans-IO decoder of the chunked transfer coding (RFC 9112 section 7.1).

    ``feed(data)`` returns the body bytes that ``data`` completes (joined) and sets ``done``
    once the last chunk and the trailer section have arrived; bytes after that are
    ``leftover``. Chunk extensions are ignored and trailers are read and dropped, but both
    are checked, so that what h11 (httpx's default transport) refuses is refused here too: an
    extension holds no control character (HTAB aside), a trailer line is a field line (a
    token, ``:``, a value without control characters; no obs-fold), a size or trailer line is
    at most ``MAX_CHUNK_LINE`` bytes and the trailer section at most ``MAX_TRAILERS``. One
    exception, on purpose: whitespace before ``;`` (BWS, which RFC 9112 allows and h11
    refuses) is accepted. On malformed framing ``feed`` raises ``httpx.RemoteProtocolError``;
    the body bytes that ``data`` completed before the fault are then in ``partial``, for the
    caller to pass on first.
    """

    __slots__ = ("_buf", "_fast", "_remaining", "_state", "_trailers", "done", "leftover",
                 "partial")

    def __init__(self) -> None:
        self._fast = True
        self._buf = b""
        self._remaining = 0
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._trailers = 0  # bytes of the trailer section consumed so far
        self.done = False
        self.leftover = b""
        self.partial = b""

    def feed(self, data: bytes) -> bytes:
        if not (self._buf or self._state):
            # The usual read of a paced stream is exactly one whole chunk: taken in three
            # C-level checks (the general loop below gives the same bytes, and any other
            # shape, a last chunk, an extension, a size with blanks, goes there).
            i = data.find(b"\r\n", 0, 18)
            if i > 0 and _HEX.fullmatch(data, 0, i) is not None:
                end = i + 2 + int(data[:i], 16)
                if end + 2 == len(data) and end > i + 2 and data.endswith(b"\r\n"):
                    return data[i + 2 : end]
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out: list[bytes] = []
        pos = 0
        if self._state == 0 and self._fast and len(data) > _FAST_MIN:
            # (A short read, a paced event's, is one chunk: the general loop takes it.)
            pos = self._fast_path(data, out)
        n = len(data)
        state = self._state
        remaining = self._remaining
        find = data.find
        while pos < n:
            if state == 1:
                end = pos + remaining
                if end > n:
                    out.append(data[pos:] if pos else data)
                    remaining -= n - pos
                    pos = n
                    break
                out.append(data[pos:end])
                pos = end
                state = 2
            if state == 2:
                if n - pos < 2:
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise self._error("malformed chunked body: no CRLF after data", out)
                pos += 2
                state = 0
                if self._fast and n - pos > _FAST_MIN:
                    # A read usually starts inside a chunk: once that one is done, the rest
                    # of the read is most likely a run of whole chunks again.
                    pos += self._fast_path(data[pos:], out)
                    if pos >= n:
                        break
            if state == 0:
                i = find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if i < 0:
                    if n - pos >= MAX_CHUNK_LINE:
                        raise self._error("chunk size line too long", out)
                    break
                line = data[pos:i]
                pos = i + 2
                semi = line.find(b";")
                if semi >= 0:
                    # h11 takes any extension but a bare LF; no control character is valid.
                    if _BAD_VALUE.search(line, semi) is not None:
                        raise self._error(
                            f"invalid character in chunk extension {line[:40]!r}", out)
                    line = line[:semi]
                line = line.rstrip(b" \t")
                if _HEX.fullmatch(line) is None:
                    raise self._error(f"malformed chunk size {line[:40]!r}", out)
                remaining = int(line, 16)
                state = 1 if remaining else 3
            elif state == 3:
                # Trailer section: header lines, then an empty line.
                if data.startswith(b"\r\n", pos):
                    self.done = True
                    self.leftover = data[pos + 2 :]
                    pos = n
                    break
                i = find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if i < 0:
                    if n - pos >= MAX_CHUNK_LINE:
                        raise self._error("trailer line too long", out)
                    if self._trailers + n - pos >= MAX_TRAILERS:
                        raise self._error("trailer section too long", out)
                    break
                if _FIELD_LINE.fullmatch(data, pos, i) is None:
                    raise self._error(f"malformed trailer line {data[pos:i][:40]!r}", out)
                self._trailers += i + 2 - pos
                if self._trailers > MAX_TRAILERS - 2:  # no room left for the final CRLF
                    raise self._error("trailer section too long", out)
                pos = i + 2
        if pos < n:
            self._buf = data[pos:]
        self._state = state
        self._remaining = remaining
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _error(self, message: str, out: list[bytes]) -> httpx.RemoteProtocolError:
        """The error to raise; keeps the body bytes decoded before it in ``partial``."""
        self.partial = b"".join(out)
        return httpx.RemoteProtocolError(message)

    def _fast_path(self, data: bytes, out: list[bytes]) -> int:
        """Decode the run of plain chunks (``<hex>CRLF<data>CRLF``, no extensions) at the
        start of ``data`` in a few C-level passes instead of a Python step per chunk; return
        where the general loop goes on. Chunk data holding a CRLF breaks the pattern: the
        general loop then takes the whole piece, and (since such a body likely repeats it)
        every later one."""
        taken = self._uniform_run(data, out)
        if taken:
            return taken
        parts = data.split(b"\r\n")
        m = (len(parts) - 1) // 2  # pairs followed by a CRLF: complete chunks, if valid
        if m < 2:
            return 0
        sizes = parts[0 : 2 * m : 2]
        bodies = parts[1 : 2 * m : 2]
        ok = (
            min(map(len, sizes)) >= 1
            and max(map(len, sizes)) <= 16
            and not b"".join(sizes).translate(None, _HEXDIGITS)
        )
        if ok:
            lengths = list(map(len, bodies))
            ok = list(map(int, sizes, repeat(16))) == lengths and 0 not in lengths
        if not ok:
            self._fast = False
            return 0
        out.append(b"".join(bodies))
        return sum(lengths) + sum(map(len, sizes)) + 4 * m

    @staticmethod
    def _uniform_run(data: bytes, out: list[bytes]) -> int:
        """Decode a run of chunks that all have the first one's size line (the shape of most
        bulk bodies: a file server's fixed-size chunks, equal-size events) without one Python
        object per chunk: check every frame's size line and CRLFs with a strided slice per
        framing byte, check that the data holds no CRLF of its own, and cut the separators
        out with one ``replace``. Return the bytes taken (0: not such a run)."""
        i = data.find(b"\r\n", 0, 18)
        if i <= 0:
            return 0
        size = data[:i]
        if size.translate(None, _HEXDIGITS):
            return 0
        length = int(size, 16)
        if length < _UNIFORM_MIN:
            return 0
        head = i + 2  # the size line and its CRLF
        period = head + length + 2
        k = len(data) // period
        if k < 2:
            return 0
        end = k * period
        tail = head + length  # the CRLF after the first chunk's data
        if data[tail:end:period] != b"\r" * k or data[tail + 1:end:period] != b"\n" * k:
            return 0
        for j in range(head):  # frames 2..k start with the same size line and CRLF
            if data[period + j:end:period] != data[j:j + 1] * (k - 1):
                return 0
        # Every CRLF in the run is framing (2 per chunk), so the separator occurs only
        # between chunks and the replace removes exactly the framing.
        if data.count(b"\r\n", 0, end) != 2 * k:
            return 0
        body = data[head:end - 2].replace(b"\r\n" + size + b"\r\n", b"")
        if len(body) != k * length:
            # Not reached after the checks above (the strided CRLF checks and this one
            # overlap: each alone refuses a misplaced CRLF after a chunk's data).
            return 0
        out.append(body)
        return end


class Sent:
    """A request written (or begun) on an idle pooled connection before its reader waits for
    the answer (:meth:`FastTransport.send_now`); :meth:`FastTransport.open` takes it on, or
    :meth:`FastTransport.discard` closes it."""

    __slots__ = ("conn", "method", "rest")

    def __init__(self, conn: _Conn, method: bytes, rest: bytes) -> None:
        self.conn = conn
        self.method = method
        self.rest = rest  # what the socket did not take at once


class _Body(httpx.AsyncByteStream):
    """The response body; returns its connection to the pool when read to a clean end.

    Two ways to read it, which may follow one another: ``async for`` (waits with trio), or
    :meth:`read_nowait` from a caller that waits for the socket itself (keepstream's upstream
    poller, ``keepstream._poller``). The framing state lives on the object, not in a generator,
    so either way picks up where the other stopped.
    """

    def __init__(
        self,
        transport: FastTransport,
        conn: _Conn,
        first: bytes,
        framing: str,
        length: int,
        reusable: bool,
        read_timeout: Any,
    ) -> None:
        self._transport = transport
        self._conn: _Conn | None = conn
        self._first = first
        self._framing = framing  # "none" | "length" | "chunked" | "close"
        self._left = length  # "length": body bytes still to come
        self._reusable = reusable
        self._read_timeout = read_timeout
        self._decoder = _ChunkedDecoder() if framing == "chunked" else None
        #: The body has been read to its end (its framing says so, or the close that ends it).
        self.complete = framing == "none"
        if framing == "none":
            self._first = b""
        elif framing == "length" and not length:
            self.complete = True
            if first:
                self._reusable = False  # bytes past the body: do not reuse
            self._first = b""

    @property
    def fd(self) -> int:
        """The connection's socket, for a caller that waits for it (-1 once closed)."""
        return -1 if self._conn is None else self._conn.sock.fileno()

    @property
    def pollable(self) -> bool:
        """:meth:`read_nowait` may be used: open, and no read timeout to run."""
        return self._conn is not None and self._read_timeout is None and not self.complete

    @property
    def partial(self) -> bytes:
        """After a framing error: the body bytes the failing read completed before it."""
        return b"" if self._decoder is None else self._decoder.partial

    def _take(self, data: bytes) -> bytes:
        """The body bytes that ``data`` (read from the socket) completes; sets ``complete``.
        A framing error raises ``httpx.RemoteProtocolError`` (see ``partial``)."""
        decoder = self._decoder
        if decoder is not None:
            out = decoder.feed(data)
            if decoder.done:
                if decoder.leftover:
                    self._reusable = False  # bytes past the body: do not reuse
                self.complete = True
            return out
        if self._framing == "length":
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                return data
            self._left = 0
            self.complete = True
            if len(data) > left:
                self._reusable = False
                return data[:left]
        return data

    def _eof(self) -> None:
        """The upstream closed the connection: the end of a close-delimited body, else an
        error."""
        if self._framing == "close":
            self.complete = True
        elif self._framing == "length":
            raise httpx.RemoteProtocolError(
                f"upstream closed the connection {self._left} bytes before the end of the "
                "body (Content-Length)")
        else:
            raise httpx.RemoteProtocolError(
                "upstream closed the connection before the end of the chunked body")

    def read_nowait(self) -> bytes:
        """One step without waiting: the bytes read with the head if any are left, else one
        non-blocking ``recv()``; returns the body bytes it completes (b"" if none, or nothing
        was waiting). Sets ``complete`` at the end of the body. Errors as ``async for``
        raises them: ``httpx.ReadError``, ``httpx.RemoteProtocolError`` (with ``partial``)."""
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        data = self._first
        if data:
            self._first = b""
        else:
            try:
                data = conn._read()
            except BlockingIOError:
                return b""
            except OSError as exc:
                raise httpx.ReadError(f"upstream read failed: {exc}") from exc
            if not data:
                self._eof()
                return b""
        return self._take(data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        timeout = self._read_timeout
        data = self._first
        self._first = b""
        while not self.complete:
            if data:
                try:
                    out = self._take(data)
                except httpx.RemoteProtocolError:
                    if self.partial:
                        yield self.partial  # the bytes before the fault come out first
                    raise
                if out:
                    yield out
                if self.complete:
                    return
            out = data = b""  # hold nothing while the stream waits (most of an idle one's life)
            data = await conn.recv(_deadline(timeout))
            if not data:
                self._eof()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._release(conn, self.complete and self._reusable)


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """Status code, reason, raw headers and HTTP/1.1-ness of a response head (no final CRLF)."""
    lines = head.split(b"\r\n")
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            if line[:1] in (b" ", b"\t"):
                raise httpx.RemoteProtocolError("obsolete line folding in the upstream's headers")
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise httpx.RemoteProtocolError(f"invalid character in header {name.decode()!r}")
        headers.append((name, value))
    return int(m.group(2)), m.group(3) or b"", headers, m.group(1) == b"1"


def _framing(
    method: bytes, status: int, headers: list[tuple[bytes, bytes]], http11: bool
) -> tuple[str, int, bool]:
    """(framing, content length, connection reusable) by RFC 9112 section 6.3."""
    te: list[bytes] = []
    lengths: set[bytes] = set()
    conn_tokens: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            te += [t.strip().lower() for t in value.split(b",") if t.strip()]
        elif lname == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif lname == b"connection":
            conn_tokens += [t.strip().lower() for t in value.split(b",")]
    reusable = (b"keep-alive" in conn_tokens) if not http11 else (b"close" not in conn_tokens)
    if method == b"HEAD" or status in (204, 304):
        return "none", 0, reusable
    if te:
        if te[-1] == b"chunked":
            return "chunked", 0, reusable and not lengths
        return "close", 0, False
    if lengths:
        if len(lengths) != 1:
            raise httpx.RemoteProtocolError("conflicting Content-Length values from upstream")
        (value,) = lengths
        if not value.isdigit() or len(value) > 18:
            raise httpx.RemoteProtocolError(f"malformed Content-Length {value[:40]!r}")
        return "length", int(value), reusable
    return "close", 0, False


def request_head(
    method: bytes, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """The request head httpx's ``Request(method, url, headers=headers, content=body)`` gives
    (what :meth:`FastTransport.handle_async_request` writes for it), by httpx's
    ``Request._prepare``: ``Host`` first unless ``headers`` has one; then ``Content-Length: 0``
    for an empty POST, PUT or PATCH without ``Content-Length`` or ``Transfer-Encoding``;
    ``headers`` as given; ``Content-Length`` last for a non-empty body unless ``headers`` has
    one. ``method`` upper-case. tests/test_transport_open.py holds the two to the same
    bytes."""
    head = [method, b" ", url.raw_path, b" HTTP/1.1\r\n"]
    host = length = chunked = False
    for name, _ in headers:
        low = name.lower()
        if low == b"host":
            host = True
        elif low == b"content-length":
            length = True
        elif low == b"transfer-encoding":
            chunked = True
    if not host and url.host:
        head += [b"Host: ", url.netloc, b"\r\n"]
    if not body and not length and not chunked and method in (b"POST", b"PUT", b"PATCH"):
        head.append(b"Content-Length: 0\r\n")
    for name, value in headers:
        head += [name, b": ", value, b"\r\n"]
    if body and not length:
        head += [b"Content-Length: ", b"%d" % len(body), b"\r\n"]
    head.append(b"\r\n")
    return b"".join(head)


def _is_ip_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


class FastTransport(httpx.AsyncBaseTransport):
    """See the module docstring. ``fallback`` serves every scheme but ``http``."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_keepalive: int = 20,
        keepalive_expiry: float = 30.0,
        fallback: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._keepalive_expiry = keepalive_expiry
        self._fallback = fallback
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._idle_order: dict[_Conn, None] = {}  # the idle connections, oldest first
        self._n_idle = 0
        self._n_conns = 0  # open connections, idle or busy
        self._freed = trio.Event()
        self._closed = False
        #: getaddrinfo's answer for an IP-literal host (it cannot change): trio's
        #: ``getaddrinfo`` costs about 25 µs per call here, once per new connection.
        self._literal_addrs: dict[tuple[str, int], list[Any]] = {}

    # -- pool -----------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, int]) -> _Conn | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            del self._idle_order[conn]
            self._n_idle -= 1
            if now - conn.idle_since > self._keepalive_expiry or conn.stale():
                self._drop(conn)
                continue
            return conn
        return None

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        self._n_conns -= 1
        self._freed.set()

    def _evict_one_idle(self) -> bool:
        conn = next(iter(self._idle_order), None)  # the oldest
        if conn is None:
            return False
        del self._idle_order[conn]
        self._idle[conn.key].remove(conn)
        self._n_idle -= 1
        self._drop(conn)
        return True

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if (
            not reusable or self._closed or self._n_idle >= self._max_keepalive
            or conn.sock.fileno() < 0
        ):
            self._drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_order[conn] = None
        self._n_idle += 1
        self._freed.set()

    async def _acquire(self, key: tuple[str, int], timeouts: dict[str, Any]) -> _Conn:
        conn = self._take_idle(key)
        if conn is not None:
            return conn
        pool_deadline = _deadline(timeouts.get("pool"))
        while self._n_conns >= self._max_connections:
            if self._evict_one_idle():
                break
            if self._freed.is_set():
                self._freed = trio.Event()
            try:
                with trio.fail_at(pool_deadline):
                    await self._freed.wait()
            except trio.TooSlowError:
                raise httpx.PoolTimeout("upstream connection pool exhausted") from None
            conn = self._take_idle(key)
            if conn is not None:
                return conn
        self._n_conns += 1
        try:
            return await self._connect(key, timeouts.get("connect"))
        except BaseException:
            self._n_conns -= 1
            self._freed.set()
            raise

    async def _connect(self, key: tuple[str, int], timeout: Any) -> _Conn:
        host, port = key
        try:
            with trio.fail_at(_deadline(timeout)):
                infos = self._literal_addrs.get(key)
                if infos is None:
                    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    if _is_ip_literal(host):
                        if len(self._literal_addrs) >= ADDR_CACHE_SIZE:
                            self._literal_addrs.clear()
                        self._literal_addrs[key] = infos
                last: OSError | None = None
                for family, type_, proto, _, addr in infos:
                    sock = socket.socket(family, type_, proto)
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        err = sock.connect_ex(addr)
                        if err in (errno.EINPROGRESS, errno.EAGAIN):
                            await trio.lowlevel.wait_writable(sock)
                            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, f"connect to {addr}: {errno.errorcode.get(err)}")
                    except OSError as exc:
                        sock.close()
                        last = exc
                        continue
                    except BaseException:
                        trio.lowlevel.notify_closing(sock)
                        sock.close()
                        raise
                    return _Conn(sock, key)
                raise last or OSError(f"no address for {host!r}")
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc

    # -- requests -------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                raise httpx.UnsupportedProtocol(f"{url.scheme!r} URLs need a fallback transport")
            return await self._fallback.handle_async_request(request)
        if self._closed:
            raise httpx.TransportError("transport closed")
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        method = request.method.encode("ascii")
        head = [method, b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        body = await request.aread()
        status, reason, headers, http11, stream = await self._exchange(
            method, url, b"".join(head) + body, timeouts)
        return httpx.Response(
            status, headers=headers, stream=stream,
            extensions={"http_version": b"HTTP/1.1" if http11 else b"HTTP/1.0",
                        "reason_phrase": reason, RAW_BODY: stream},
        )

    def can_open(self, url: httpx.URL) -> bool:
        """:meth:`open` serves ``url`` (``http://``; others go through httpx's Request)."""
        return url.scheme == "http" and not self._closed

    def send_now(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes,
    ) -> Sent | None:
        """Write the request :meth:`open` would, now and without waiting, on an idle pooled
        connection to ``url``'s host: the upstream starts on it while the caller's tasks go on
        (``LiveStream.send_early``: a scheduler pass sooner). None, and nothing written, when
        no idle connection is there, the socket takes nothing now (the connection goes back
        to the pool) or fails (it is closed): :meth:`open` then does it all. ``url`` must pass
        :meth:`can_open`. A returned request is :meth:`open`'s or :meth:`discard`'s to end."""
        key = (url.host, url.port or 80)
        conn = self._take_idle(key)
        if conn is None:
            return None
        method_b = method.upper().encode("ascii")
        data = request_head(method_b, url, headers, body) + body
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)  # (reset while idle: open() takes a new connection)
            return None
        if not sent:
            self._release(conn, True)
            return None
        return Sent(conn, method_b, data[sent:])

    def discard(self, sent: Sent) -> None:
        """Close the connection of a request :meth:`send_now` wrote that no one will read."""
        self._drop(sent.conn)

    async def open(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes,
        timeouts: dict[str, Any], sent: Sent | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], _Body]:
        """:meth:`handle_async_request` for the request that ``build_request(method, url,
        headers=headers, content=body)`` of an ``httpx.AsyncClient`` with no default headers,
        cookies or params (as ``make_client`` makes it) would give, without its ``Request`` and
        ``Response`` objects: the same bytes go upstream (:func:`request_head`); returns the
        status, the raw response headers and the body. ``url`` must pass :meth:`can_open`.
        ``timeouts``: ``httpx.Timeout.as_dict()``. ``sent``: this request, written already
        by :meth:`send_now` (then ``headers`` and ``body`` are not used)."""
        if sent is not None:
            status, _, raw, _, stream = await self._exchange(
                sent.method, url, sent.rest, timeouts, sent.conn)
            return status, raw, stream
        method_b = method.upper().encode("ascii")
        status, _, raw, _, stream = await self._exchange(
            method_b, url, request_head(method_b, url, headers, body) + body, timeouts)
        return status, raw, stream

    async def _exchange(
        self, method: bytes, url: httpx.URL, data: bytes, timeouts: dict[str, Any],
        conn: _Conn | None = None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool, _Body]:
        """Send ``data`` (a whole request, or the rest of one begun on ``conn``) on a pooled
        connection and read the response head: (status, reason, raw headers, HTTP/1.1-ness,
        the body)."""
        if conn is None:
            conn = await self._acquire((url.host, url.port or 80), timeouts)
        try:
            if data:
                await conn.send_all(data, _deadline(timeouts.get("write")))
            del data
            read_deadline = _deadline(timeouts.get("read"))
            buf = b""
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise httpx.RemoteProtocolError("upstream response head too large")
                    got = await conn.recv(read_deadline)
                    if not got:
                        raise httpx.RemoteProtocolError(
                            "upstream closed the connection without sending a response")
                    buf += got
                    continue
                status, reason, headers, http11 = _parse_head(buf[:end])
                buf = buf[end + 4 :]
                if 100 <= status < 200:
                    if status == 101:
                        raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
                    continue  # an informational response: the real one follows
                break
            framing, length, reusable = _framing(method, status, headers, http11)
        except BaseException:
            self._drop(conn)
            raise
        if framing == "none" and buf:
            reusable = False  # bytes after a bodiless response: do not reuse
        stream = _Body(self, conn, buf, framing, length, reusable, timeouts.get("read"))
        return status, reason, headers, http11, stream

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                self._drop(conn)
        self._idle.clear()
        self._idle_order.clear()
        self._n_idle = 0
        if self._fallback is not None:
            await self._fallback.aclose()
