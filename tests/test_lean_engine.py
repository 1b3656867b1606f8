"""The lean HTTP/1.1 engine (``server.engine = "lean"``, ``_h1.py``) on real loopback sockets.

Its own framing, keep-alive, refusals and shutdown are tested here with small ASGI apps (so each
test controls exactly what the app does); keepstream's behaviour on top of it is tested by the
rest of the suite, which runs under either engine (``KEEPSTREAM_ENGINE=lean``, as `.ci/run`
does for the fault matrix).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Any

import pytest
import trio

from keepstream import ServerConfig
from keepstream._app import DIRECT_EXTENSION
from keepstream._h1 import serve_lean
from keepstream._supervisor import SINK_TAKEN
from keepstream.testing import FakeUpstream, chaos_request, run_keepstream

from .conftest import make_config

App = Callable[[Any, Any, Any], Awaitable[None]]


@asynccontextmanager
async def lean(app: App, *, keep_alive: float = 5.0, graceful: float = 1.0,
               backlog: int = 16) -> AsyncIterator[tuple[int, trio.Event]]:
    """Serve ``app`` with the lean engine on 127.0.0.1; yields (port, stop event)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.setblocking(False)
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_lean(
                app, sock, keep_alive_timeout=keep_alive, graceful_timeout=graceful,
                shutdown_trigger=stop.wait, task_status=task_status))
            yield sock.getsockname()[1], stop
            stop.set()
    finally:
        sock.close()


async def read_until_closed(stream: trio.SocketStream, limit: float = 5.0) -> bytes:
    """Everything until the server closes; then closes our side too."""
    data = b""
    try:
        with trio.fail_after(limit):
            while chunk := await stream.receive_some(65536):
                data += chunk
    finally:
        await stream.aclose()
    return data


async def read_response(stream: trio.SocketStream, buf: bytearray) -> bytes:
    """One response (head + Content-Length or chunked body) from ``stream``; the rest stays
    in ``buf``."""
    async def more() -> None:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed early; got {bytes(buf)!r}"
        buf.extend(chunk)

    with trio.fail_after(5):
        while b"\r\n\r\n" not in buf:
            await more()
        head, _, _ = bytes(buf).partition(b"\r\n\r\n")
        end = len(head) + 4
        low = head.lower()
        if b"transfer-encoding: chunked" in low:
            while b"\r\n0\r\n\r\n" not in buf[end - 2:]:
                await more()
            end = buf.index(b"\r\n0\r\n\r\n", end - 2) + 7
        else:
            length = 0
            for line in low.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(buf) < end + length:
                await more()
            end += length
        out = bytes(buf[:end])
        del buf[:end]
        return out


async def hello(scope: Any, receive: Any, send: Any) -> None:
    """Echo the method, path and body, with Content-Length."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    out = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} ".encode() + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


async def test_keep_alive_and_pipelining_in_order() -> None:
    async with lean(hello) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        reqs = b"".join(
            b"POST /p%d?q=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab%d" % (i, i, i)
            for i in range(5))
        await stream.send_all(reqs)  # all five at once: pipelined
        buf = bytearray()
        for i in range(5):
            resp = await read_response(stream, buf)
            assert resp.startswith(b"HTTP/1.1 200 OK\r\n")
            assert resp.endswith(b"POST /p%d q=%d ab%d" % (i, i, i)), resp
            assert resp.lower().count(b"content-length:") == 1
        # The same connection takes a sixth, later request.
        await stream.send_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(stream, buf)).endswith(b"GET /again  ")
        await stream.aclose()


async def test_chunked_response_and_head_and_no_body_statuses() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        status = int(scope["path"][1:])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"x-a", b"1"), (b"transfer-encoding", b"gzip")]})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await send({"type": "http.response.body", "body": b" world", "more_body": False})

    async with lean(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = bytearray()
        await stream.send_all(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(stream, buf)
        head, _, body = resp.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head and b"gzip" not in head  # framing is ours
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        # HEAD: the same head, no body, and the connection stays usable.
        await stream.send_all(b"HEAD /200 HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                buf.extend(await stream.receive_some(65536))
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and rest == b""
        buf.clear()
        for status in (204, 304):
            await stream.send_all(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % status)
            with trio.fail_after(5):
                while b"\r\n\r\n" not in buf:
                    buf.extend(await stream.receive_some(65536))
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            assert b"transfer-encoding" not in head.lower() and rest == b""
            buf.clear()
        await stream.aclose()


async def test_http10_is_close_delimited() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one ", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})

    async with lean(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        data = await read_until_closed(stream)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
        assert body == b"one two"


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # A head over 16 KiB that is still incomplete (h11's limit, as under Hypercorn; a complete
    # one read at once goes to the app, whose own check answers 431).
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000, 431),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 403),
])
async def test_refusals_answer_and_close(raw: bytes, status: int) -> None:
    called = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal called
        called += 1
        await hello(scope, receive, send)

    async with lean(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(raw)
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
        assert b"connection: close" in data and data.endswith(b"\r\n\r\n")
    assert called == 0


async def test_app_failures_do_not_end_the_server() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/raise":
            raise ValueError("boom")
        if scope["path"] == "/silent":
            return
        if scope["path"] == "/cut":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
            return  # never ended: the client must not see a clean end
        if scope["path"] == "/badheader":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-evil", b"a\r\nset-cookie: x")]})
            return
        await hello(scope, receive, send)

    async with lean(app) as (port, _):
        for path, expect in ((b"/raise", b"HTTP/1.1 500 "), (b"/silent", b"HTTP/1.1 500 "),
                             (b"/badheader", b"HTTP/1.1 500 ")):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            data = await read_until_closed(stream)
            assert data.startswith(expect), (path, data)
            assert b"set-cookie" not in data
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await read_until_closed(stream)
        assert data.endswith(b"4\r\npart\r\n"), data  # no terminating chunk
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(stream, bytearray())).endswith(b"GET /ok  ")
        await stream.aclose()


async def test_content_length_mismatch_closes_the_connection() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"short"})

    async with lean(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await read_until_closed(stream)
        assert data.endswith(b"\r\n\r\n")  # the head only; the short body is not sent


async def test_expect_100_continue() -> None:
    async with lean(hello) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            got = await stream.receive_some(65536)
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"data")
        assert (await read_response(stream, bytearray())).endswith(b"POST /up  data")
        await stream.aclose()


async def test_disconnect_reaches_a_waiting_receive_and_response_end_too() -> None:
    seen: list[str] = []
    first_sent = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        first_sent.set()
        seen.append((await receive())["type"])  # waits for the client to go

    async with lean(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            await first_sent.wait()
            await stream.aclose()
            while not seen:
                await trio.sleep(0.01)
    assert seen == ["http.disconnect"]

    ended: list[str] = []

    async def app2(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                ended.append((await receive())["type"])

            nursery.start_soon(watch)
            await trio.sleep(0.05)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async with lean(app2) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(stream, bytearray())).endswith(b"ok")
        await stream.aclose()
    assert ended == ["http.disconnect"]  # the response's end woke the waiting receive()


async def test_keep_alive_timeout_closes_idle_and_slow_heads(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with lean(hello, keep_alive=2.0) as (port, _):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET / HTTP/1.1\r\nHo")  # a head that never completes
        start = trio.current_time()
        assert await read_until_closed(idle, 10) == b""
        assert await read_until_closed(slow, 10) == b""
        assert 2.0 <= trio.current_time() - start < 3.0


async def test_a_head_already_read_is_served_refused_or_waited_for_under_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Requests sent in one write with the one before (pipelined): each next head is parsed
    from what is already read, without the keep-alive timeout; a bad one is refused as any
    other; a part of a head still waits for its rest under ``keep_alive_timeout``."""
    async with lean(hello, keep_alive=2.0) as (port, _):
        whole = await trio.open_tcp_stream("127.0.0.1", port)
        await whole.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        assert (await read_response(whole, buf)).endswith(b"GET /a  ")
        assert (await read_response(whole, buf)).endswith(b"GET /b  ")
        await whole.aclose()

        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nbad\r\n\r\n")
        buf = bytearray()
        assert (await read_response(bad, buf)).endswith(b"GET /a  ")
        rest = bytes(buf) + await read_until_closed(bad)
        assert rest.startswith(b"HTTP/1.1 400 "), rest

        part = await trio.open_tcp_stream("127.0.0.1", port)
        await part.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo")
        buf = bytearray()
        assert (await read_response(part, buf)).endswith(b"GET /a  ")
        start = trio.current_time()
        assert bytes(buf) + await read_until_closed(part, 10) == b""
        assert 2.0 <= trio.current_time() - start < 3.0


async def test_heads_in_pieces_take_the_fast_parse_or_h11_under_one_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A head that arrives a few bytes at a time: a plain GET is served once its blank line
    is in; a POST, known only once its head is whole, goes to h11 for its body, and still
    gets it; a head that turns out to be for h11 (bare LF line ends) and never completes is
    dropped ``keep_alive_timeout`` after the wait began, not after the hand-over to h11."""
    async with lean(hello, keep_alive=2.0) as (port, _):
        for raw, want in [
            (b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
             b"GET /a q=1 "),
            (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
             b"POST /p  hello"),
        ]:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            for i in range(0, len(raw), 7):
                await stream.send_all(raw[i:i + 7])
                await trio.sleep(0.1)  # the whole head well within keep_alive_timeout
            buf = bytearray()
            assert (await read_response(stream, buf)).endswith(want)
            await stream.aclose()

        start = trio.current_time()
        lf = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(1.5)
        await lf.send_all(b"GET / HTTP/1.1\nHost: x\n")  # h11's from here; never completes
        assert await read_until_closed(lf, 10) == b""
        assert 1.99 <= trio.current_time() - start < 2.5  # not 1.5 s + 2 s


async def test_a_pipelined_flood_answered_at_once_does_not_hold_the_event_loop() -> None:
    """200 requests in one write, each answered without waiting (no request waits for a head,
    a body or a socket): the connection still lets other tasks run while it works through
    them, not only once it is done."""
    served = 0
    seen: list[int] = []

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        nonlocal served
        served += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    n = 200
    with trio.fail_after(10):
        async with lean(quick) as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * n)
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while served < n:
                        seen.append(served)
                        await trio.lowlevel.checkpoint()

                nursery.start_soon(watch)
                got = b""
                while got.count(b"HTTP/1.1 204") < n:
                    got += await stream.receive_some(1 << 20)
            await stream.aclose()
    assert any(0 < k < n for k in seen), seen[:5]


async def test_a_burst_of_waiting_connections_does_not_hold_the_event_loop() -> None:
    """150 connections already in the listen backlog: the accept loop takes them without
    waiting, and still lets other tasks run between them (each accepted connection is a new
    task: the number of living tasks is seen to grow in steps, not at once)."""
    n = 150
    seen: list[int] = []
    with trio.fail_after(10):
        async with lean(hello, backlog=n + 10) as (port, _):
            await trio.sleep(0.05)  # the accept loop waits for a connection
            base = trio.lowlevel.current_statistics().tasks_living
            clients = []
            for _ in range(n):  # completed by the kernel (backlog), not yet accepted
                c = socket.create_connection(("127.0.0.1", port))
                clients.append(c)
            while (living := trio.lowlevel.current_statistics().tasks_living) < base + n:
                seen.append(living - base)
                await trio.lowlevel.checkpoint()
            for c in clients:
                c.close()
    assert any(0 < k < n for k in seen), seen[:5]


async def test_shutdown_closes_idle_and_ends_busy_after_their_response() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": b"done"})

    with trio.fail_after(10):
        async with lean(app, graceful=5.0) as (port, stop):
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            await busy.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(5):
                head = await busy.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200")
            await trio.sleep(0.05)  # the idle one is accepted and waiting
            stop.set()
            assert await read_until_closed(idle) == b""  # closed at once
            release.set()
            rest = await read_until_closed(busy)
            assert rest.endswith(b"4\r\ndone\r\n0\r\n\r\n")  # its response ended properly


async def test_stalled_reader_does_not_block_the_writer_forever() -> None:
    """A client that stops reading: writes wait (cancellable), other connections go on."""
    big = b"z" * (1 << 20)
    writes = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal writes
        if scope["path"] == "/fast":
            await hello(scope, receive, send)
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with trio.move_on_after(1.0):
            while True:
                await send({"type": "http.response.body", "body": big, "more_body": True})
                writes += 1

    with trio.fail_after(10):
        async with lean(app) as (port, _):
            stalled = await trio.open_tcp_stream("127.0.0.1", port)
            await stalled.send_all(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
            await trio.sleep(0.3)
            fast = await trio.open_tcp_stream("127.0.0.1", port)
            await fast.send_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(fast, bytearray())).endswith(b"GET /fast  ")
            await fast.aclose()
            await trio.sleep(1.0)
            data = await read_until_closed(stalled)  # cut after the app's timeout
            assert not data.endswith(b"0\r\n\r\n")
    assert 1 <= writes < 50  # it was blocked, not spinning


async def test_keepstream_on_the_lean_engine(fake_upstream: FakeUpstream,
                                             journal_url: str) -> None:
    """keepstream's app on the lean engine: a proxied SSE stream journaled byte for byte, and
    admin endpoints on the same kept-alive connection."""
    cfg = make_config(fake_upstream.url, journal_url,
                      server=ServerConfig(bind="127.0.0.1:0", engine="lean",
                                          drain_timeout=2.0, stop_grace=10.0))
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            assert ks.config.server.engine in ("lean", "hypercorn")  # the env may override
            res = await chaos_request(ks.port, "GET", "/s", headers=[("X-Fake-Events", "5")])
            assert res.status == 200 and res.complete
            sid = res.header("keepstream-id")
            assert sid is not None
            rec = await ks.wait_terminal(sid.decode())
            assert rec["status"] == "completed"
            (ex,) = fake_upstream.exchanges
            assert await ks.body(sid.decode()) == bytes(ex.body_sent) == res.body
            stream = await trio.open_tcp_stream("127.0.0.1", ks.port)
            buf = bytearray()
            for path in (b"/_keepstream/healthz", b"/_keepstream/streams/" + sid, b"/s"):
                await stream.send_all(b"GET %s HTTP/1.1\r\nHost: x\r\n"
                                      b"X-Fake-Events: 2\r\n\r\n" % path)
                resp = await read_response(stream, buf)
                assert resp.startswith(b"HTTP/1.1 200 OK"), resp[:200]
            await stream.aclose()


async def test_http2_preface_is_refused_and_h2c_upgrade_ignored() -> None:
    async with lean(hello) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 505 ") and b"connection: close" in data
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /up HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                              b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        resp = await read_response(stream, bytearray())
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"GET /up  ")
        await stream.aclose()


async def test_paced_stream_takes_the_direct_path(
    fake_upstream: FakeUpstream, journal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paced events reach the client through the stream task's direct write (one task wake
    per event), byte for byte, with a proper end of body."""
    from keepstream import _h1

    calls: list[int] = []
    original = _h1._Connection.send_nowait

    def counting(self: _h1._Connection, body: bytes) -> int:
        result = original(self, body)
        calls.append(result)
        return result

    monkeypatch.setattr(_h1._Connection, "send_nowait", counting)
    monkeypatch.setenv("KEEPSTREAM_ENGINE", "lean")
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/p", headers=[
                ("X-Fake-Events", "20"), ("X-Fake-Interval", "0.01")])
            assert res.status == 200 and res.complete
            (ex,) = fake_upstream.exchanges
            assert res.body == bytes(ex.body_sent)
            sid = res.header("keepstream-id")
            assert sid is not None
            assert (await ks.wait_terminal(sid.decode()))["status"] == "completed"
    assert calls.count(SINK_TAKEN) >= 10, calls  # most events went the direct way


async def test_a_relay_parked_on_the_poller_reads_ahead_and_sees_the_client_leave(
    fake_upstream: FakeUpstream, journal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a paced stream's relay is parked (the upstream poller watching the client's
    socket): a request the client pipelines mid-stream is kept and answered after the
    stream, on the same connection; a client that closes mid-stream is seen at once (its
    record shows when), and the stream follows the route's policy (``finish``)."""
    from keepstream import _h1

    parks: list[bool] = []
    original = _h1._Connection._park

    async def counting(self: _h1._Connection, poller: Any, ahead: bytearray) -> bool:
        parks.append(True)
        return await original(self, poller, ahead)

    monkeypatch.setattr(_h1._Connection, "_park", counting)
    monkeypatch.setenv("KEEPSTREAM_ENGINE", "lean")
    cfg = make_config(fake_upstream.url, journal_url)
    head = ("GET /{} HTTP/1.1\r\nHost: x\r\nX-Fake-Events: 20\r\n"
            "X-Fake-Interval: 0.01\r\n\r\n")
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            stream = await trio.open_tcp_stream("127.0.0.1", ks.port)
            await stream.send_all(head.format("first").encode())
            buf = bytearray()
            while b"data:" not in buf:  # the stream is running, its relay parked
                buf += await stream.receive_some(65536)
            await stream.send_all(head.format("second").encode())  # pipelined
            first = await read_response(stream, buf)
            second = await read_response(stream, buf)
            await stream.aclose()
            assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
            assert first.endswith(b"\r\n0\r\n\r\n") and second.endswith(b"\r\n0\r\n\r\n")
            assert len(fake_upstream.exchanges) == 2
            parked = len(parks)
            assert parked >= 2

            leaving = await trio.open_tcp_stream("127.0.0.1", ks.port)
            await leaving.send_all(head.format("leaving").encode())
            buf = bytearray()
            while b"data:" not in buf:
                buf += await leaving.receive_some(65536)
            sid = bytes(buf).split(b"keepstream-id: ")[1].split(b"\r\n")[0].decode()
            await leaving.aclose()
            row = await ks.wait_terminal(sid)
            assert row["status"] == "completed"  # finish: the upstream read to its end
            gone, ended = (datetime.fromisoformat(str(row[k]))
                           for k in ("client_gone_at", "ended_at"))
            assert (ended - gone).total_seconds() > 0.05  # seen mid-stream, not at its end
    assert len(parks) > parked


async def test_the_head_goes_out_before_any_body(
    fake_upstream: FakeUpstream, journal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay parks in the engine while the upstream has answered nothing yet; the upstream's
    head alone wakes it, so the client gets status and headers while the body has not started
    (an LLM that answers and then thinks), and leaving then still counts as leaving."""
    monkeypatch.setenv("KEEPSTREAM_ENGINE", "lean")
    cfg = make_config(fake_upstream.url, journal_url, on_disconnect="cancel")
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            stream = await trio.open_tcp_stream("127.0.0.1", ks.port)
            await stream.send_all(b"GET /h HTTP/1.1\r\nHost: x\r\nX-Fake-Stall-After: 0\r\n"
                                  b"X-Fake-Delay-Headers: 0.2\r\n\r\n")
            head = b""
            with trio.fail_after(3):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"keepstream-id: " in head
            assert head.endswith(b"\r\n\r\n")  # nothing of the body: the upstream sent none
            sid = head.split(b"keepstream-id: ")[1].split(b"\r\n")[0].decode()
            await stream.aclose()
            rec = await ks.wait_terminal(sid)
            assert rec["client_gone_at"] is not None and rec["status"] == "cancelled"


async def test_connections_are_bare_descriptors_non_blocking_no_delay_and_closed() -> None:
    """The accept loop keeps only each connection's descriptor: it is non-blocking, has
    TCP_NODELAY (set once on the listener, which Linux passes to every accepted socket), and
    is closed when the connection ends (no descriptor left behind after many)."""
    seen: list[tuple[bool, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        fd = scope["extensions"][DIRECT_EXTENSION].fd
        probe = socket.socket(fileno=os.dup(fd))
        try:
            seen.append((os.get_blocking(fd),
                         probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        finally:
            probe.close()
        await hello(scope, receive, send)

    async with lean(app) as (port, _):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 200 ")
        with trio.fail_after(5):
            while len(os.listdir("/proc/self/fd")) > before:
                await trio.sleep(0.01)
    assert seen == [(False, 1)] * 20


def _whole_answer(event: bytes) -> bytes:
    """A chunked SSE answer of one event, to be written in one piece (read whole at once)."""
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))


@asynccontextmanager
async def _lean_before(
    nursery: trio.Nursery, upstream: Callable[[trio.SocketStream], Awaitable[None]],
    db: Any,
) -> AsyncIterator[Any]:
    """keepstream on the lean engine (SQLite journal ``db``) in front of ``upstream``, a
    raw handler served on 127.0.0.1; skipped if ``KEEPSTREAM_ENGINE`` chose another engine."""
    listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    cfg = make_config(f"http://127.0.0.1:{port}", f"sqlite:///{db}",
                      server=ServerConfig(bind="127.0.0.1:0", engine="lean",
                                          drain_timeout=2.0, stop_grace=10.0))
    async with run_keepstream(cfg) as ks:
        if ks.config.server.engine != "lean":
            pytest.skip("KEEPSTREAM_ENGINE chose another engine")
        yield ks


async def test_a_short_answer_reaches_the_client_before_its_end_is_durable(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    """An upstream answer read whole at once (head, one event, end) while the journal's
    database is locked (another connection holds its write lock from the moment the
    upstream answers): the head and the event reach the client without waiting for the
    journal; the clean end of body only once the completed record is durable."""
    db = tmp_path / "journal.db"
    event = b"data: hello\n\n"
    locks: list[sqlite3.Connection] = []

    async def upstream(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the stream's record exists: no commit from now on
        locks.append(lock)
        await stream.send_all(_whole_answer(event))
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with _lean_before(nursery, upstream, db) as ks:
            client = await trio.open_tcp_stream("127.0.0.1", ks.port)
            await client.send_all(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while event not in got:
                got += await client.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 200 OK") and b"keepstream-id: " in got
            assert not got.endswith(b"0\r\n\r\n")  # the end waits for the journal
            (lock,) = locks
            await trio.sleep(0.2)  # the journal retries meanwhile; still locked: no end
            with trio.move_on_after(0.05):
                got += await client.receive_some(65536)
            assert not got.endswith(b"0\r\n\r\n")
            sid = got.split(b"keepstream-id: ")[1].split(b"\r\n")[0].decode()
            lock.rollback()  # the journal commits now, then the end goes out
            lock.close()
            while not got.endswith(b"0\r\n\r\n"):
                data = await client.receive_some(65536)
                assert data, "closed before the end of the body"
                got += data
            await client.aclose()
            rec = await ks.wait_terminal(sid)
            assert rec["status"] == "completed"
            assert await ks.body(sid) == event


async def test_a_short_answer_is_written_before_its_terminal_commit(
    tmp_path: Any, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answer read whole at once, the journal free: the stream task writes the
    response head and the event (``start_nowait``, ``send_nowait``) before its terminal row's
    inline commit, and the relay writes the clean end after it. (Spies that call through to
    the real methods record the order.)"""
    from keepstream import _h1
    from keepstream._journal import SQLiteBackend

    order: list[tuple[str, object]] = []
    commit, start, send_nowait = (SQLiteBackend.try_commit_inline,
                                  _h1._Connection.start_nowait, _h1._Connection.send_nowait)
    send = _h1._Connection.send

    def spy_commit(self: SQLiteBackend, batch: Any) -> bool:
        done = commit(self, batch)
        order.append(("commit", tuple(row["status"] for row in batch.rows) if done else ()))
        return done

    def spy_start(self: _h1._Connection, status: int, headers: Any) -> int:
        order.append(("head", status))
        return start(self, status, headers)

    def spy_send_nowait(self: _h1._Connection, body: bytes) -> int:
        order.append(("body", body))
        return send_nowait(self, body)

    async def spy_send(self: _h1._Connection, message: Any) -> None:
        order.append(("send", message.get("body", message["type"])))
        await send(self, message)

    monkeypatch.setattr(SQLiteBackend, "try_commit_inline", spy_commit)
    monkeypatch.setattr(_h1._Connection, "start_nowait", spy_start)
    monkeypatch.setattr(_h1._Connection, "send_nowait", spy_send_nowait)
    monkeypatch.setattr(_h1._Connection, "send", spy_send)
    event = b"data: hello\n\n"

    async def upstream(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                buf = buf.split(b"\r\n\r\n", 1)[1]
                await stream.send_all(_whole_answer(event))

    with trio.fail_after(20):
        async with _lean_before(nursery, upstream, tmp_path / "journal.db") as ks:
            for _ in range(2):  # a new upstream connection, then a kept-alive one
                await trio.sleep(0.05)  # (the journal's own flushes come and go meanwhile)
                order.clear()
                res = await chaos_request(ks.port, "GET", "/s")
                assert res.status == 200 and res.complete and res.body == event
                terminal = order.index(("commit", ("completed",)))
                assert order.index(("head", 200)) < order.index(("body", event)) < terminal
                assert order.index(("send", b"")) > terminal  # the end: after it is durable
