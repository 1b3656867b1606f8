"""A raw-socket HTTP/1.1 client that misbehaves on purpose: :func:`chaos_request`.

It sends one request (built by hand, or ``raw_request`` verbatim), parses the answer with h11 and
stops exactly where asked: after ``k`` body bytes, after ``N`` SSE events, stalled with the socket
open, with a FIN or an RST (``SO_LINGER 0``), after a half-close, with a tiny receive buffer. The
request is sent by a task of its own, so an answer that arrives while the request body is still
being sent (a 413, a 400) is read all the same. With ``read_after`` it reads on after the first
response until the peer ends the connection: what a server sends after its answer (a second
answer to bytes pipelined behind a refused request: smuggling) is in ``ChaosResult.after``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["ChaosResult", "chaos_request"]

_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8
_MAX_HEAD = 1 << 22


@dataclass
class ChaosResult:
    """What :func:`chaos_request` saw.

    ``body`` is the de-chunked body received up to the stop point (exactly ``k`` bytes when the
    client stopped after ``k``); ``raw`` is every byte read from the socket. ``complete`` is True
    when a proper end of response arrived (the 0-chunk, the full Content-Length, or EOF for an
    EOF-delimited body). ``closed_by_peer`` is True when the peer closed or reset the connection
    before the client closed it; ``reset_by_peer`` when that was an RST. ``error`` describes what
    went wrong (a connect failure starts with ``"connect: "``; reset, protocol error,
    ``"timeout"``), else None. ``after`` is every byte received after the end of the first
    response (or after the point where it could not be parsed): pipelined answers, or anything
    the server sent once it had answered; empty when the client stopped reading on purpose.
    """

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""
    complete: bool = False
    closed_by_peer: bool = False
    error: str | None = None
    reset_by_peer: bool = False
    events: int = 0
    send_error: str | None = None
    after: bytes = b""

    def header(self, name: str) -> bytes | None:
        """Return the first response header ``name`` (case-insensitive), or None."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k.lower() == key:
                return v
        return None


def _build_request(
    port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> tuple[bytes, bytes]:
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: 127.0.0.1:{port}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if (
        "content-length" not in names
        and "transfer-encoding" not in names
        and (body or method.upper() in {"POST", "PUT", "PATCH"})
    ):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    return head, body


def _method_of(raw: bytes) -> bytes:
    method = raw.split(b" ", 1)[0]
    if method and method.isalpha() and method.isascii():
        return method
    return b"GET"


def _set_linger_zero(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _peer_state(sock: trio.socket.SocketType) -> tuple[bool, bool] | None:
    """(peer closed, it was a reset) from the kernel, without reading; None if unknown."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 8)[0]
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return None
    if err == errno.ECONNRESET:
        return True, True
    if state == _TCP_CLOSE:
        return True, True
    return state == _TCP_CLOSE_WAIT, False


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    return f"{type(cause).__name__}: {cause}"


async def chaos_request(
    port: int,
    method: str = "GET",
    target: str = "/",
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    disconnect_after_bytes: int | None = None,
    disconnect_after_events: int | None = None,
    reset: bool = False,
    read_delay: float = 0.0,
    read_size: int = 65536,
    stall_after_bytes: int | None = None,
    hold: float = 30.0,
    half_close: bool = False,
    recv_buffer: int | None = None,
    timeout: float = 30.0,
    raw_request: bytes | None = None,
    body_interval: float = 0.0,
    body_piece: int = 1,
    host: str = "127.0.0.1",
    read_after: float = 0.0,
) -> ChaosResult:
    """Send one request to ``host:port`` and read the answer, misbehaving as asked.

    - ``disconnect_after_bytes=k``: close right after ``k`` body bytes (0: right after the head).
    - ``disconnect_after_events=N``: close right after the ``N``-th ``\\n\\n`` in the body.
    - ``stall_after_bytes=k``: after ``k`` body bytes stop reading without closing; keep the
      socket open until ``hold`` seconds pass or the peer closes (seen without reading).
    - ``reset``: every close by the client is an RST (``SO_LINGER 0``) instead of a FIN. Note
      that the kernel also sends an RST for a plain close when received bytes are still unread.
    - ``half_close``: ``shutdown(SHUT_WR)`` right after the request is sent (no scheduler
      pass in between when the whole request goes out at once).
    - ``read_delay`` / ``read_size``: sleep between reads / bytes per read.
    - ``recv_buffer``: ``SO_RCVBUF`` set before connecting.
    - ``raw_request``: send these bytes verbatim instead of building a request.
    - ``body_interval``: send the body ``body_piece`` bytes at a time with this pause between.
    - ``read_after=s``: once the first response ended (or could not be parsed), read on for up
      to ``s`` seconds, until the peer closes the connection (``closed_by_peer``); what arrives
      is added to ``ChaosResult.after``. Not with ``disconnect_after_*`` or ``stall_after_bytes``.
    - ``timeout``: bound on the whole call; reaching it sets ``error="timeout"``.

    Never raises for network trouble; everything is reported in the :class:`ChaosResult`.
    Raises ``ValueError`` for ``read_after`` combined with a stop option.
    """
    if read_after > 0 and not (
        disconnect_after_bytes is None and disconnect_after_events is None
        and stall_after_bytes is None
    ):
        raise ValueError("read_after reads on after the response: it cannot stop before that")
    result = ChaosResult()
    if raw_request is not None:
        head, payload = raw_request, b""
        parse_method = _method_of(raw_request)
    else:
        head, payload = _build_request(port, method, target, headers or [], body)
        parse_method = method.upper().encode("ascii", "replace")

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if recv_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    raw = bytearray()
    got = bytearray()
    after = bytearray()
    closed = False

    def close_socket() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        if reset:
            _set_linger_zero(sock)
        sock.close()

    async def send_request(stream: trio.SocketStream) -> None:
        try:
            if body_interval > 0 and payload:
                await stream.send_all(head)
                step = max(1, body_piece)
                for i in range(0, len(payload), step):
                    if i:
                        await trio.sleep(body_interval)
                    await stream.send_all(payload[i : i + step])
            elif half_close:
                # The FIN right behind the request, as a client that half-closes sends it:
                # no scheduler pass between them (send_all yields once its bytes are out), in
                # which a server on the same event loop could already be answering.
                data = head + payload
                await trio.lowlevel.checkpoint()
                try:
                    sent = os.write(stream.socket.fileno(), data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    await stream.send_all(data[sent:])
                stream.socket.shutdown(socket.SHUT_WR)
                return
            else:
                await stream.send_all(head + payload)
            if half_close:
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            result.send_error = _describe(exc)

    try:
        with trio.move_on_after(timeout) as deadline:
            try:
                await sock.connect((host, port))
            except OSError as exc:
                result.error = f"connect: {type(exc).__name__}: {exc}"
                return result
            stream = trio.SocketStream(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_request, stream)
                rest = await _read_response(
                    stream,
                    parse_method,
                    result,
                    raw,
                    got,
                    disconnect_after_bytes=disconnect_after_bytes,
                    disconnect_after_events=disconnect_after_events,
                    stall_after_bytes=stall_after_bytes,
                    read_delay=read_delay,
                    read_size=read_size,
                )
                if stall_after_bytes is not None and result.error is None and not result.complete:
                    await _hold(sock, result, hold)
                if rest is not None:
                    after += rest
                    if read_after > 0 and not result.closed_by_peer:
                        await _read_on(stream, result, raw, after, read_after, read_size)
                nursery.cancel_scope.cancel()
        if deadline.cancelled_caught and result.error is None:
            result.error = "timeout"
    finally:
        close_socket()
        result.raw = bytes(raw)
        result.body = bytes(got)
        result.after = bytes(after)
        result.events = _count_events(result.body)
    return result


async def _hold(sock: trio.socket.SocketType, result: ChaosResult, hold: float) -> None:
    """Keep a stalled socket open until ``hold`` passes or the peer closes it."""
    with trio.move_on_after(hold):
        while True:
            state = _peer_state(sock)
            if state is not None and state[0]:
                result.closed_by_peer = True
                result.reset_by_peer = state[1]
                return
            await trio.sleep(0.005 if state is not None else hold)


async def _read_on(
    stream: trio.SocketStream,
    result: ChaosResult,
    raw: bytearray,
    after: bytearray,
    seconds: float,
    read_size: int,
) -> None:
    """After the first response: read until the peer ends the connection or ``seconds`` pass."""
    with trio.move_on_after(seconds):
        while True:
            try:
                data = await stream.receive_some(read_size)
            except trio.BrokenResourceError as exc:
                result.closed_by_peer = True
                result.reset_by_peer = isinstance(exc.__cause__, ConnectionResetError)
                return
            if not data:
                result.closed_by_peer = True
                return
            raw += data
            after += data


async def _read_response(
    stream: trio.SocketStream,
    method: bytes,
    result: ChaosResult,
    raw: bytearray,
    got: bytearray,
    *,
    disconnect_after_bytes: int | None,
    disconnect_after_events: int | None,
    stall_after_bytes: int | None,
    read_delay: float,
    read_size: int,
) -> bytes | None:
    """Read and parse the first response. Return the bytes received after its end (or after
    the point where it could not be parsed), or None when the client stopped on purpose."""
    parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "chaos")]))
    parser.send(h11.EndOfMessage())
    byte_limit: int | None = None
    for limit in (disconnect_after_bytes, stall_after_bytes):
        if limit is not None:
            byte_limit = limit if byte_limit is None else min(byte_limit, limit)
    scan = 0
    events = 0
    first_read = True
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            result.error = f"RemoteProtocolError: {exc}"
            return parser.trailing_data[0]
        if event is h11.NEED_DATA:
            if read_delay > 0 and not first_read:
                await trio.sleep(read_delay)
            first_read = False
            try:
                data = await stream.receive_some(read_size)
            except trio.BrokenResourceError as exc:
                result.closed_by_peer = True
                result.reset_by_peer = isinstance(exc.__cause__, ConnectionResetError)
                result.error = _describe(exc)
                return parser.trailing_data[0]
            if not data:
                result.closed_by_peer = True
            raw += data
            parser.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            result.status = event.status_code
            result.headers = list(event.headers.raw_items())
            if byte_limit == 0 or disconnect_after_events == 0:
                return None
        elif isinstance(event, h11.Data):
            got += event.data
            stop = False
            if byte_limit is not None and len(got) >= byte_limit:
                del got[byte_limit:]
                stop = True
            if disconnect_after_events is not None:
                while (idx := got.find(b"\n\n", scan)) >= 0:
                    scan = idx + 2
                    events += 1
                    if events >= disconnect_after_events:
                        del got[scan:]
                        stop = True
                        break
                else:
                    scan = max(scan, len(got) - 1)
            if stop:
                return None
        elif isinstance(event, h11.EndOfMessage):
            result.complete = True
            return parser.trailing_data[0]
        else:  # h11.ConnectionClosed (or PAUSED after a CONNECT's 2xx / a 101)
            return parser.trailing_data[0]


def _count_events(body: bytes) -> int:
    count = 0
    pos = body.find(b"\n\n")
    while pos >= 0:
        count += 1
        pos = body.find(b"\n\n", pos + 2)
    return count
