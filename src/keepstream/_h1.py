"""The lean HTTP/1.1 engine: ``keepstream serve --engine lean``.

An ASGI HTTP/1.1 server on trio sockets, for keepstream's own app, with one task per connection
(the app runs in it). Through the direct path (``keepstream.direct``, this connection as a
``_supervisor.Direct``) the relay parks here while the stream task writes new chunks to the
socket itself, and the connection tells the relay when the client left: no watcher task. It
exists for speed: under Hypercorn every connection carries a ``TCPServer``, a task group, an
idle task and h11 on both directions, and every response write takes a lock and a scheduler
pass; the minimal relay on Hypercorn alone costs more CPU per request than issue 8's whole
budget (docs/performance.md).

What it does, and how it differs from Hypercorn (docs/configuration.md, ``engine``):

* A request without a body (no ``Content-Length``, ``Transfer-Encoding`` or ``Expect``: the
  GET of a stream) whose head is plain (CRLF lines, HTTP/1.1 with one ``Host`` or HTTP/1.0)
  is parsed here, with h11's own grammar (``_parse_head``): h11's per-request state machine,
  event objects and header normalization cost more than the rest of the parse. Every other
  request, and any head the fast parse does not take whole, goes to h11 (one
  ``h11.Connection`` per request, fed what the previous one left over), so what h11 refuses is
  refused the same way: ``error_status_hint`` (400, 431...), an empty body and
  ``Connection: close``. Heads over 16 KiB are refused.
* Responses are framed here: ``Content-Length`` when the app gave one, chunked otherwise
  (HTTP/1.1), close-delimited for HTTP/1.0; no body for HEAD, 1xx, 204 and 304. A write goes
  out in one non-blocking ``send()``; only what the socket does not take waits (cancellable;
  a write cut short breaks the connection, which is then closed: never a torn frame followed
  by another response).
* ``receive()`` after the request body waits on the socket: EOF, a reset, or the end of the
  response gives ``http.disconnect``. Pipelined bytes are kept (up to 64 KiB) for the next
  request.
* Plain HTTP/1.1 (and 1.0) only: no TLS, no HTTP/2 (its preface gets 505; an ``Upgrade: h2c``
  is ignored, which RFC 9110 allows), no WebSocket (refused with 403, as keepstream's app
  refuses it under Hypercorn).
* A response the app started but did not end closes the connection without the terminating
  chunk, as under Hypercorn: the client never sees a clean end of a failed stream.
* Keep-alive: ``keep_alive_timeout`` bounds the wait for the next request's whole head (so a
  slow-loris head is dropped too). Once a drain cuts its remaining streams (``close_trigger``),
  every response ends with ``Connection: close`` and its connection. On shutdown, idle
  connections close at once; busy ones end after their response, and whatever is still open
  ``graceful_timeout`` later is cancelled.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import h11
import trio

from ._app import DIRECT_EXTENSION, Message, Receive, Scope, Send
from ._poller import UpstreamPoller
from ._supervisor import SINK_BLOCKED, SINK_REFUSED, SINK_TAKEN

log = logging.getLogger("keepstream")

App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Largest request head accepted (Hypercorn's ``h11_max_incomplete_size`` as keepstream sets it).
MAX_HEAD = 16 * 1024
#: Pipelined bytes read ahead while a request is in flight; past this, reading pauses.
MAX_READ_AHEAD = 64 * 1024
RECV_SIZE = 64 * 1024
#: Sends in a row that did not yield before one does (so a loop of sends cannot starve others).
YIELD_EVERY = 32
#: ``_Connection._head_now``: the client closed or reset before a whole request head.
_GONE = object()

#: ``_Connection._fast_head``: the head is not all here yet; wait for more.
_WAIT = object()

# h11 0.16's grammar (h11/_abnf.py: request_line, header_field), compiled for fullmatch: a
# head the fast parse takes is one h11 takes the same way (tests/test_lean_head.py).
_TOKEN_RE = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"
_REQUEST_LINE = re.compile(
    rb"(" + _TOKEN_RE + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_HEADER_FIELD = re.compile(
    rb"(" + _TOKEN_RE + rb"):[ \t]*((?:" + _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR +
    rb"+)*)?)[ \t]*")
#: Headers that give a request a body (or a 100-continue exchange): h11 reads those requests.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"expect"})


class _Head:
    """A request head parsed by :func:`_parse_head`: what ``_serve`` reads of h11's
    ``Request`` (header names lower-cased, values without surrounding whitespace)."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 http_version: bytes) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version


def _parse_head(buf: bytearray, end: int) -> _Head | None:
    """The request head ``buf[:end]`` (``buf[end:end + 4]`` is its blank line) as a
    :class:`_Head`, taken out of ``buf``; None, leaving ``buf`` as it is, when h11 must read
    this request: it has a body, or its head is anything but plain (h11 then accepts or
    refuses it as it always did)."""
    if end > MAX_HEAD:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    method, target, version = m.groups()
    if version != b"1.1" and version != b"1.0":
        return None
    headers = []
    hosts = 0
    match = _HEADER_FIELD.fullmatch
    for line in lines[1:]:
        f = match(line)
        if f is None:
            return None
        name = f[1].lower()
        if name in _FRAMING:
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, f[2]))
    if hosts > 1 or (not hosts and version == b"1.1"):
        return None  # h11 refuses it (400)
    del buf[:end + 4]
    return _Head(method, target, headers, version)


_REASONS: dict[int, bytes] = {}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_NO_BODY = frozenset({204, 304})
_DISCONNECT: Message = {"type": "http.disconnect"}
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _reason(status: int) -> bytes:
    r = _REASONS.get(status)
    if r is None:
        from http import HTTPStatus

        try:
            r = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            r = b""
        _REASONS[status] = r
    return r


class _Date:
    """The ``Date`` header value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_date = _Date()
_INF = float("inf")


class _Server:
    __slots__ = ("app", "closing", "graceful_timeout", "idle", "keep_alive_timeout", "server",
                 "terminated", "tick")

    def __init__(self, app: App, keep_alive_timeout: float, graceful_timeout: float,
                 server: tuple[str, int] | None) -> None:
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
        self.graceful_timeout = graceful_timeout
        self.server = server
        self.terminated = False
        self.closing = False  # keep-alive is over: each connection closes after its response
        self.idle: set[_Connection] = set()  # waiting for a request head
        #: How often :meth:`sweep` looks for keep-alive waits past their deadline: the timeout
        #: fires between ``keep_alive_timeout`` and that plus one tick.
        self.tick = max(0.01, min(1.0, keep_alive_timeout / 8))

    def terminate(self) -> None:
        self.terminated = self.closing = True
        for conn in list(self.idle):
            conn.close_idle()

    async def sweep(self) -> None:
        """End the keep-alive waits past their deadline (:meth:`_Connection._wait_head`), every
        ``tick``. One task for all of them, instead of a cancel scope and a deadline per wait:
        the wait for a new connection's first head is one of the few a short request has."""
        while True:
            await trio.sleep(self.tick)
            now = trio.current_time()
            for conn in list(self.idle):
                if conn._deadline <= now:
                    conn._cut_wait()


class _Connection:
    """One client connection: requests in turn, the app run in this task."""

    __slots__ = (
        "_ahead", "_body_done", "_broken", "_chunked", "_cl_left", "_close", "_continued", "_cut",
        "_deadline", "_h", "_head_only", "_http10", "_idle_scope", "_lock", "_parked", "_peer_gone",
        "_pending", "_poller", "_recv_scope", "_response_done", "_started", "_unyielded", "client",
        "fd", "server",
    )

    def __init__(self, server: _Server, fd: int, client: tuple[str, int] | None) -> None:
        self.server = server
        #: The connection's socket, as a descriptor only (no socket object: see accept_loop);
        #: non-blocking, so os.read() and os.write() never wait. Closed by run().
        self.fd = fd
        self.client = client
        self._idle_scope: trio.CancelScope | None = None  # while h11 waits for a request head
        self._deadline = _INF  # of the keep-alive wait in progress (_wait_head)
        self._cut = False  # that wait was ended (timeout, shutdown): the connection closes
        self._lock: trio.Lock | None = None  # made by the first write that has to wait
        self._unyielded = 0
        self._peer_gone = False
        self._h: h11.Connection | None = None  # while the request's head and body are read
        self._parked: trio.lowlevel.Task | None = None  # the relay, in wait_client's poller park
        self._poller: UpstreamPoller | None = None  # watching this socket for that park
        self._ahead: bytearray | None = None  # after the body: the next request's bytes
        self._http10 = False
        self._reset()

    def _reset(self) -> None:
        self._body_done = False
        self._continued = False
        self._pending = b""
        self._broken = False
        self._started = False
        self._response_done = False
        self._chunked = False
        self._head_only = False
        self._close = False
        self._cl_left: int | None = None
        self._recv_scope: trio.CancelScope | None = None

    # -- the connection's life ------------------------------------------------------------

    def close_idle(self) -> None:
        """Shutdown: end the wait for the next request (only a connection between requests
        has one; a busy connection finishes its response first)."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        self._cut_wait()

    def _cut_wait(self) -> None:
        """End :meth:`_wait_head`'s wait, now or as soon as it begins: the connection closes."""
        self._cut = True
        if self._deadline != _INF:
            trio.lowlevel.notify_closing(self.fd)  # its wait_readable raises ClosedResourceError

    async def run(self) -> None:
        try:
            await self._requests()
        except Exception:
            # A failure of this server's own code on this connection's bytes: it ends this
            # connection alone, never the server.
            log.warning("keepstream: a connection failed in the lean engine; closed it",
                        exc_info=True)
        finally:
            # This task is the only one that waits on the socket in trio (the relay parks in
            # keepstream's poller, which let it go already), and it waits no more: trio has no
            # registration left for it but the kernel's one-shot entry, which the close
            # removes. Only a cut wait (the sweeper's notify_closing) was registered, and that
            # notify_closing took it out already. (trio's own close() calls notify_closing
            # anyway: an EPOLL_CTL_DEL and a few calls per connection this skips.)
            os.close(self.fd)

    async def _requests(self) -> None:
        srv = self.server
        while not srv.terminated:
            srv.idle.add(self)
            try:
                request = await self._next_request()
            finally:
                srv.idle.discard(self)
                self._idle_scope = None
            if request is None:
                return
            serve = self._serve(request)
            del request  # the request's only reference is _serve's, which drops it early
            if not await serve:
                return

    async def _next_request(self) -> h11.Request | _Head | None:
        """The next request head, or None (closed, timed out, refused)."""
        old = self._h
        closed = False
        if old is not None:
            leftover, closed = old.trailing_data
            buf = bytearray(leftover)
        else:
            buf = self._ahead or bytearray()
        self._ahead = None
        self._h = None
        self._reset()
        # The head is most often here already (a new connection's first request, a pipelined
        # one): it is parsed without arming the keep-alive timeout, a cancel scope that costs
        # more than the parse. Only a head still to come is waited for under it.
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline: float | None = None  # of the keep-alive wait, once one began
        event: object | None = None if closed else self._fast_head(buf)
        if event is _WAIT:
            deadline = trio.current_time() + self.server.keep_alive_timeout
            event = await self._wait_head(buf, deadline)
            if event is _WAIT:
                return None  # keep-alive timeout (or shutdown)
        if isinstance(event, _Head):
            self._ahead = buf  # what came after the head: the next request's bytes
            if deadline is None:
                await self._count_unyielded()
            return event
        if event is _GONE:
            return None
        # Not for the fast parse (None): h11 reads this request, from what is here.
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if buf:
            h.receive_data(bytes(buf))
        if closed:
            h.receive_data(b"")
        self._h = h
        try:
            event = self._head_now(h)
        except h11.RemoteProtocolError as exc:
            event = exc  # answered under the timeout below (the answer's write can wait)
        if deadline is None and event is not None and \
                not isinstance(event, h11.RemoteProtocolError):
            await self._count_unyielded()
            return event if isinstance(event, h11.Request) else None
        idle = self._idle_scope = trio.move_on_after(self.server.keep_alive_timeout) \
            if deadline is None else trio.move_on_at(deadline)
        with idle:
            while True:
                if isinstance(event, h11.RemoteProtocolError):
                    await self._refuse(event.error_status_hint)
                    return None
                if event is not None:
                    return event if isinstance(event, h11.Request) else None
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    event = self._head_now(h)
                except h11.RemoteProtocolError as exc:
                    event = exc
        return None  # keep-alive timeout (or a head that never completed)

    async def _wait_head(self, buf: bytearray, deadline: float) -> object:
        """:meth:`_fast_head` once the socket is readable, until it gives more than ``_WAIT``
        or the wait is cut: at ``deadline`` by :meth:`_Server.sweep`, or by shutdown
        (:meth:`close_idle`); then ``_WAIT``. No cancel scope: a cut is a ``notify_closing``
        of the socket, which the connection closes next."""
        event: object = _WAIT
        self._deadline = deadline
        try:
            while event is _WAIT and not self._cut:
                try:
                    await trio.lowlevel.wait_readable(self.fd)
                except trio.ClosedResourceError:
                    break  # cut
                event = self._fast_head(buf)
        finally:
            self._deadline = _INF
        return event

    async def _count_unyielded(self) -> None:
        """A head served without a wait. No yield for each: the request then waits for its
        upstream anyway. Every YIELD_EVERY-th (with the writes that did not wait) still
        yields, so a client pipelining requests answered at once cannot hold the event loop."""
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _fast_head(self, buf: bytearray) -> object:
        """The request head from ``buf`` and what the socket holds now (read into ``buf``,
        never waiting): a :class:`_Head`; ``_WAIT`` when the rest is still to come; ``_GONE``
        when the client closed or reset first; None when h11 must read this request (see
        :func:`_parse_head`; a head that is not CRLF-framed or over ``MAX_HEAD``)."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return _parse_head(buf, end)
            # What h11 reads differently, or refuses at once: bare LF line ends, an empty
            # line or a control character first, a head too long.
            if len(buf) > MAX_HEAD or (buf and buf[0] < 0x21) or \
                    buf.count(b"\n") != buf.count(b"\r\n"):
                return None
            got = self._read_now()
            if got is None:
                return _WAIT
            if not got:
                return _GONE
            buf += got

    def _read_now(self) -> bytes | None:
        """What the client sent, without waiting: None when nothing is there yet; ``b""``
        (and the client marked gone) when it closed or reset."""
        try:
            got = os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            got = b""
        if not got:
            self._peer_gone = True
        return got

    def _head_now(self, h: h11.Connection) -> object | None:
        """Parse the request head from what is here, reading without waiting: h11's event (a
        ``Request``, or ``ConnectionClosed``: PAUSED cannot come before a request), ``_GONE``
        when the client closed or reset, None when the rest is still to come. Raises
        ``h11.RemoteProtocolError`` for a bad head."""
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            got = self._read_now()
            if got is None:
                return None
            if not got:
                return _GONE
            h.receive_data(got)

    async def _recv(self) -> bytes | None:
        """Bytes from the client, or None when it closed or reset. A checkpoint, as trio's
        ``sock.recv()``, but a read on the descriptor itself: two coroutine frames less for
        every connection parked here (the relay waits in it for the whole stream)."""
        fd = self.fd
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(fd, RECV_SIZE)
        except BlockingIOError:
            data = None
        except OSError:
            self._peer_gone = True
            return None
        if data is None:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, RECV_SIZE)
                    break
                except BlockingIOError:
                    continue
                except OSError:
                    self._peer_gone = True
                    return None
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not data:
            self._peer_gone = True
            return None
        return data

    async def _serve(self, request: h11.Request | _Head) -> bool:
        """Run the app for one request; True if the connection can take another."""
        target = request.target
        path, _, query = target.partition(b"?")
        try:
            text_path = unquote(path.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            await self._refuse(400)
            return False
        method = request.method.decode("ascii").upper()
        headers = list(request.headers)
        if method == "GET" and _is_websocket(headers):
            await self._refuse(403)
            return False
        version = request.http_version.decode("ascii")
        if version not in ("1.1", "1.0"):
            await self._refuse(505)  # h11 parses "PRI * HTTP/2.0" (the HTTP/2 preface) too
            return False
        self._http10 = version == "1.0"
        if version != "1.1" or self.server.closing:
            self._close = True
        for name, value in headers:
            if name == b"connection" and b"close" in value.lower():
                self._close = True
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "method": method,
            "scheme": "http",
            "path": text_path,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.server.server,
            "extensions": {DIRECT_EXTENSION: self},
        }
        self._head_only = method == "HEAD"
        del request, target  # h11's event and its headers: not kept while a stream runs
        try:
            await self.server.app(scope, self.receive, self.send)
        except Exception:
            log.exception("keepstream: the app failed on %s %s", method, text_path)
            if not self._started and not self._peer_gone:
                await self._refuse(500)
                return False
        if not self._response_done:
            if not self._started and not self._broken and not self._peer_gone:
                # An ASGI app that returned without answering (keepstream's does that only
                # for a client that left, which gets nothing).
                await self._refuse(500)
            return False  # started but never ended: cut, no terminating chunk
        if self._broken or self._close or self._peer_gone:
            return False
        # An app that answered without reading all of the body: the next request's start is
        # unknown, so the connection ends here.
        return self._finish_body()

    async def _refuse(self, status: int) -> None:
        """An error answer of the server's own: empty body, connection closed after it."""
        if self._started:
            return
        self._started = self._response_done = True
        head = b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\ndate: %s\r\n\r\n" % (
            status, _reason(status), _date())
        await self._write(head)

    def _finish_body(self) -> bool:
        """After the app returned: take the rest of the request body if it is already here
        (an app that never called ``receive()``, e.g. an admin GET). True when the request
        is fully read, so the connection can take the next one."""
        h = self._h
        if h is None:
            return True  # the body was read whole (receive() let h11 go then)
        taken = 0
        while h.their_state is h11.SEND_BODY and taken <= MAX_READ_AHEAD:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            if type(event) is h11.Data:
                taken += len(event.data)
                continue
            if type(event) is not h11.EndOfMessage:
                return False  # NEED_DATA: the rest is not here; not worth waiting for
        return h.their_state is h11.DONE

    # -- ASGI ------------------------------------------------------------------------------

    async def receive(self) -> Message:
        if self._response_done or self._broken:
            return _DISCONNECT
        while not self._body_done:
            h = self._h
            if h is None:  # a head parsed without h11 (_parse_head): no body
                self._body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if h.they_are_waiting_for_100_continue and not self._started and \
                    not self._continued:
                self._continued = True
                await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint)
                self._broken = True
                return _DISCONNECT
            if event is h11.NEED_DATA:
                data = await self._recv()
                if data is None:
                    h.receive_data(b"")  # the next event is then an error: disconnect
                    self._broken = True
                    return _DISCONNECT
                h.receive_data(data)
                continue
            if type(event) is h11.Data:
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if type(event) is h11.EndOfMessage:
                self._body_done = True
                # h11 is done with this request: keep only the bytes already read past it
                # (pipelined), not its state machine, for the rest of the response.
                self._ahead = bytearray(h.trailing_data[0])
                self._h = None
                return {"type": "http.request", "body": b"", "more_body": False}
            self._broken = True  # ConnectionClosed mid-body
            return _DISCONNECT
        # The body is in: wait for the client to leave (or the response to end).
        scope = trio.CancelScope()
        self._recv_scope = scope
        ahead = self._ahead
        assert ahead is not None
        with scope:
            while not self._response_done:
                if len(ahead) >= MAX_READ_AHEAD:
                    await trio.sleep_forever()  # until the response ends (scope cancelled)
                data = await self._recv()
                if data is None:
                    return _DISCONNECT
                ahead += data  # pipelined: the next request's bytes
        self._recv_scope = None
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self._started or self._response_done:
                raise RuntimeError("http.response.body out of order")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self._head_only:
                out = b""
            elif self._chunked:
                out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out = body
                if self._cl_left is not None:
                    self._cl_left -= len(body)
                    if self._cl_left < 0 or (not more and self._cl_left):
                        self._broken = True  # more or less than Content-Length said
                        out = b""
            if not more:
                self._response_done = True
                if self._recv_scope is not None:
                    self._recv_scope.cancel()
                self._resume()
                if self._cl_left is None and not self._chunked and not self._head_only:
                    self._close = True  # close-delimited body
            if self._pending:
                out = self._pending + out  # what the direct path could not write at once
                self._pending = b""
            if out:
                await self._write(out)
            elif not more:
                await self._yield()
            return
        if kind == "http.response.start":
            if self._started:
                raise RuntimeError("http.response.start sent twice")
            head = self._head(message["status"], message.get("headers", ()))
            self._started = True
            await self._write(head)
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r}")

    # -- the direct path (keepstream._supervisor.Direct) -----------------------------------

    async def wait_client(self, poller: UpstreamPoller | None = None) -> bool:
        """Until :meth:`wake` (or the end of the response); True when the client left. Reads
        what the client sends meanwhile as the next request's bytes (up to
        ``MAX_READ_AHEAD``), as :meth:`receive` does after the body. Only after the request
        body was read whole.

        With ``poller`` (the upstream poller, ``keepstream._poller``) the relay parks without
        a cancel scope: the poller watches the socket (:meth:`on_readable`) and :meth:`wake`
        reschedules the task. A cancel scope's wake (cancel, abort the epoll wait, unwind an
        exception) cost about three times a reschedule, twice per short stream."""
        if self._peer_gone or self._broken:
            await trio.lowlevel.checkpoint_if_cancelled()
            return True
        ahead = self._ahead
        assert ahead is not None and self._body_done
        if poller is None or not await self._park(poller, ahead):
            return await self._wait_client_scoped(ahead)
        return self.client_gone()

    async def _park(self, poller: UpstreamPoller, ahead: bytearray) -> bool:
        """:meth:`wait_client` through ``poller``; False when it cannot (the poller stopped,
        or the read-ahead is full): the caller then waits under a cancel scope."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._read_ahead(ahead) or self._response_done:
            return True  # the client left (or the response ended) already
        if len(ahead) >= MAX_READ_AHEAD or not poller.add(self.fd, self):
            return False
        self._poller = poller
        self._parked = trio.lowlevel.current_task()
        try:
            await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        finally:
            self._unpark()
        # Woken: what the client did meanwhile counts first. A close that arrived in the same
        # moment as the wake (the poller would report it a scheduler pass later) is a client
        # that left before this response went on (a half-close right after the request).
        if not self._response_done and self._read_ahead(ahead):
            return len(ahead) < MAX_READ_AHEAD  # full: wait the other way
        return True

    def _read_ahead(self, ahead: bytearray) -> bool:
        """Take what the client sent into ``ahead``, never waiting; False once it left."""
        while len(ahead) < MAX_READ_AHEAD:
            data = self._read_now()
            if data is None:
                return True
            if not data:
                return False
            ahead += data
        return True

    def on_readable(self) -> None:
        """The poller's call (``PollTarget``): the parked relay's client sent something."""
        ahead = self._ahead
        if ahead is None or not self._read_ahead(ahead) or len(ahead) >= MAX_READ_AHEAD:
            self._resume()  # the client left, or the read-ahead is full

    def on_poller_gone(self) -> None:
        self._resume()  # the relay parks again, the other way (poller.add refuses now)

    def _resume(self) -> None:
        task = self._parked
        if task is not None:
            self._unpark()
            trio.lowlevel.reschedule(task)

    def _unpark(self) -> None:
        self._parked = None
        poller = self._poller
        if poller is not None:
            self._poller = None
            poller.discard(self.fd)

    def _abort_park(self, _: Any) -> trio.lowlevel.Abort:
        self._unpark()
        return trio.lowlevel.Abort.SUCCEEDED

    async def _wait_client_scoped(self, ahead: bytearray) -> bool:
        scope = trio.CancelScope()
        self._recv_scope = scope
        try:
            with scope:
                while not self._response_done:
                    if len(ahead) >= MAX_READ_AHEAD:
                        await trio.sleep_forever()  # until woken
                    data = await self._recv()
                    if data is None:
                        return True
                    ahead += data
        finally:
            self._recv_scope = None
        return self.client_gone()

    def wake(self) -> None:
        if self._recv_scope is not None:
            self._recv_scope.cancel()
        self._resume()

    def client_gone(self) -> bool:
        return self._peer_gone or self._broken  # broken: nothing more reaches the client

    def send_nowait(self, body: bytes) -> int:
        """The direct path's write (the ``keepstream.direct`` scope extension is this
        connection, a ``Direct``): frame ``body`` as the next chunk and write it now, from
        whichever task calls it, never waiting. ``SINK_BLOCKED``: the socket took part of it;
        the rest goes out first with the app's next ``send()``. Refused (the app sends it
        itself) unless the response is a chunked one in progress with nothing else waiting to
        be written."""
        if not self._chunked or not self._started or self._response_done or self._broken or \
                self._pending or self._writing():
            return SINK_REFUSED
        if not body:
            return SINK_TAKEN
        return self._write_nowait(b"%x\r\n%b\r\n" % (len(body), body))

    def _write_nowait(self, out: bytes) -> int:
        """The direct path's write: ``SINK_TAKEN``, or ``SINK_BLOCKED`` with the rest kept
        for the app's next ``send()``."""
        try:
            sent = os.write(self.fd, out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken = True  # the client left: dropped, as send() drops it
            self._peer_gone = True
            return SINK_TAKEN
        if sent == len(out):
            return SINK_TAKEN
        self._pending = out[sent:]
        return SINK_BLOCKED

    def start_nowait(self, status: int, headers: list[tuple[bytes, bytes]]) -> int:
        """The direct path's response head (``Direct.start_nowait``), written now from the
        stream task, never waiting: as ``send()``'s ``http.response.start``, whose turn it
        takes. ``SINK_BLOCKED``: the socket took part of it; the rest goes out first with the
        app's next ``send()``. Refused (the app sends the head itself, or learns that the
        client left) if anything was sent or is waiting to be, the client is gone (read
        first, as the relay does when woken), or the head is not one this server writes."""
        if self._started or self._broken or self._pending or self._writing():
            return SINK_REFUSED
        ahead = self._ahead
        if ahead is not None and not self._read_ahead(ahead):
            # The client left (a close or a half-close that the poller has not reported
            # yet): as the relay's own check when woken, no response starts.
            return SINK_REFUSED
        try:
            head = self._head(status, headers)
        except RuntimeError:
            return SINK_REFUSED  # the app's send() raises it, as it would have
        self._started = True
        return self._write_nowait(head)

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        length: int | None = None
        for name, value in headers:
            name = bytes(name)
            value = bytes(value)
            low = name.lower()
            if not _TOKEN.match(name) or _BAD_VALUE.search(value):
                raise RuntimeError(f"invalid response header {name!r}")
            if low == b"content-length":
                if not value.isdigit():
                    raise RuntimeError("invalid Content-Length")
                length = int(value)
                continue
            elif low == b"transfer-encoding":
                continue  # framing is the server's
            elif low == b"connection":
                if b"close" in value.lower():
                    self._close = True
                continue
            lines.append(b"%b: %b\r\n" % (name, value))
        no_body = status < 200 or status in _NO_BODY
        if no_body:
            self._head_only = True
        elif length is not None:
            lines.append(b"content-length: %d\r\n" % length)
            if not self._head_only:
                self._cl_left = length
        elif self._http10:
            self._close = True  # close-delimited
        else:
            lines.append(b"transfer-encoding: chunked\r\n")
            self._chunked = not self._head_only
        if self._close or self.server.closing:
            self._close = True
            lines.append(b"connection: close\r\n")
        lines.append(b"date: %b\r\n\r\n" % _date())
        return b"".join(lines)

    def _writing(self) -> bool:
        """A write is waiting for the socket (what it holds must go out first)."""
        return self._lock is not None and self._lock.locked()

    async def _write(self, data: bytes) -> None:
        """Write all of ``data``. Never raises for a client that left (ASGI servers do not):
        the connection is marked broken and later writes are dropped."""
        if self._broken:
            await self._yield()
            return
        if not self._writing():
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._broken = True
                self._peer_gone = True
                await self._yield()
                return
            if sent == len(data):
                await self._yield()
                return
            data = data[sent:]
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            view = memoryview(data)
            try:
                while view and not self._broken:
                    await trio.lowlevel.wait_writable(self.fd)
                    try:
                        sent = os.write(self.fd, view)
                    except BlockingIOError:
                        continue
                    view = view[sent:]
            except OSError:
                self._broken = True
                self._peer_gone = True
            except BaseException:
                self._broken = True  # cancelled mid-write: the framing is torn
                raise
        self._unyielded = 0

    async def _yield(self) -> None:
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()


def _is_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


async def serve_lean(
    app: App,
    sock: socket.socket,
    *,
    keep_alive_timeout: float,
    graceful_timeout: float,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    close_trigger: Callable[[], Awaitable[Any]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``sock`` (listening, non-blocking) until ``shutdown_trigger`` returns; then stop
    accepting, close idle connections and give busy ones ``graceful_timeout`` to finish.

    Once ``close_trigger`` (if given) returns, keep-alive ends while accepting goes on: every
    connection (a new one too) closes after its next response, with ``Connection: close``."""
    sock.setblocking(False)  # accepted on directly (accept_loop)
    try:
        # Set once here: Linux gives an accepted TCP socket its listener's TCP_NODELAY, which
        # saves a setsockopt() per connection (tests/test_lean_engine.py checks it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP
    name = sock.getsockname()
    host, port = name[0], name[1]
    server = _Server(app, keep_alive_timeout, graceful_timeout, (host, port))
    shown = f"[{host}]" if ":" in host else host
    binds = [f"http://{shown}:{port}"]

    async with trio.open_nursery() as connections:

        async def accept_loop() -> None:
            run = 0  # accepts in a row that did not wait
            while True:
                # The listening socket itself, not trio's accept(): its try-first helper is an
                # async context manager (a generator and an exception per accept that waits).
                # A run of accepts that do not wait yields every YIELD_EVERY-th, as trio's
                # yields after each one, so a connection flood cannot hold the event loop.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    # The descriptor alone: a socket object would cost a getsockname() and
                    # Python-level enum conversions per connection, and the connection only
                    # ever reads, writes and closes it (os.read, os.write, os.close).
                    fd, addr = sock._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    run = 0
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_RETRY:
                        # The wording of trio.serve_listeners' message, which the Hypercorn
                        # engine logs in the same case.
                        log.warning("accept returned %s (%s); retrying in 0.1 seconds",
                                    errno.errorcode.get(exc.errno or 0, exc.errno),
                                    os.strerror(exc.errno or 0))
                        await trio.sleep(0.1)
                        continue
                    raise
                try:
                    os.set_blocking(fd, False)  # (TCP_NODELAY comes from the listener)
                    peer = (addr[0], addr[1]) if isinstance(addr, tuple) else None
                    connections.start_soon(_Connection(server, fd, peer).run)
                except BaseException:
                    os.close(fd)
                    raise
                run += 1
                if run >= YIELD_EVERY:
                    run = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()

        async with trio.open_nursery() as accepting:
            accepting.start_soon(accept_loop)
            accepting.start_soon(server.sweep)
            if close_trigger is not None:

                async def end_keep_alive(trigger: Callable[[], Awaitable[Any]]) -> None:
                    await trigger()
                    server.closing = True

                accepting.start_soon(end_keep_alive, close_trigger)
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        server.terminate()
        connections.cancel_scope.deadline = trio.current_time() + graceful_timeout


__all__ = ["serve_lean"]
