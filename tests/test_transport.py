"""keepstream's upstream transport (``keepstream._transport``): the chunked decoder over every
chunking (hypothesis), response framing by RFC 9112 section 6.3, and the transport itself
against raw loopback servers: exact request bytes, keep-alive reuse, bodies cut short, 1xx,
pool limits, stale idle connections, cancellation, and the fallback for other schemes.

Rules: every server is on 127.0.0.1, port 0, started with ``nursery.start``; every socket test
is bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from keepstream import _transport
from keepstream._transport import (
    MAX_TRAILERS,
    FastTransport,
    _ChunkedDecoder,
    _framing,
    _parse_head,
)

# -- the chunked decoder (sans-IO) ------------------------------------------------------------


def _encode(chunks: list[bytes], exts: list[bool], trailers: list[bytes]) -> bytes:
    out = bytearray()
    for i, c in enumerate(chunks):
        ext = b";name=value" if exts[i % len(exts)] else b""
        out += f"{len(c):x}".encode() + ext + b"\r\n" + c + b"\r\n"
    out += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return bytes(out)


def _feed_all(pieces: list[bytes]) -> tuple[bytes, _ChunkedDecoder, bytes]:
    """Feed until done: (body, decoder, everything after the body)."""
    dec = _ChunkedDecoder()
    got = bytearray()
    for i, p in enumerate(pieces):
        got += dec.feed(p)
        if dec.done:
            return bytes(got), dec, dec.leftover + b"".join(pieces[i + 1 :])
    return bytes(got), dec, b""


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    exts=st.lists(st.booleans(), min_size=1, max_size=3),
    trailers=st.lists(st.sampled_from([b"x-t: 1", b'etag: "a"']), max_size=2),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    extra=st.binary(max_size=20),
)
def test_decoder_any_chunking_gives_the_body(
    chunks: list[bytes], exts: list[bool], trailers: list[bytes], cuts: list[int],
    extra: bytes,
) -> None:
    wire = _encode(chunks, exts, trailers)
    got, dec, rest = _feed_all(_split(wire + extra, cuts))
    assert dec.done
    assert got == b"".join(chunks)
    assert rest == extra  # what came after the body is handed back, never eaten


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=6),
    cut=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_decoder_truncated_gives_a_prefix_and_not_done(
    chunks: list[bytes], cut: int, cuts: list[int]
) -> None:
    wire = _encode(chunks, [False], [])
    wire = wire[: cut % (len(wire) - 1)]  # stop before the final CRLF
    got, dec, _ = _feed_all(_split(wire, cuts))
    assert not dec.done
    assert b"".join(chunks).startswith(got)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=20, max_size=200),
    crlf_at=st.lists(st.integers(min_value=0, max_value=199), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=12),
)
def test_decoder_long_runs_take_the_fast_path_mid_read(
    sizes: list[int], crlf_at: list[int], cuts: list[int]
) -> None:
    """Many small chunks split into a few reads: reads start inside a chunk, so the decoder
    goes from its general loop to the fast path and back, and a CRLF inside chunk data (here
    and there) turns the fast path off for good; the body must come out the same."""
    chunks = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    for i in crlf_at:
        if i < len(chunks) and len(chunks[i]) >= 2:
            chunks[i] = b"\r\n" + chunks[i][2:]
    wire = _encode(chunks, [False], [])
    saved = _transport._FAST_MIN
    for fast_min in (0, saved):  # 0: try the fast path after every chunk's end
        _transport._FAST_MIN = fast_min
        try:
            got, dec, rest = _feed_all(_split(wire, cuts))
        finally:
            _transport._FAST_MIN = saved
        assert dec.done and rest == b""
        assert got == b"".join(chunks)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
    exts=st.lists(st.booleans(), min_size=1, max_size=3),
    upper=st.booleans(),
    zeros=st.integers(min_value=0, max_value=3),
)
def test_decoder_one_whole_chunk_per_read(
    chunks: list[bytes], exts: list[bool], upper: bool, zeros: int
) -> None:
    """Each read exactly one chunk (a paced stream's usual read, which ``feed`` takes in a
    shortcut): the same body as any other chunking, sizes in either case and with leading
    zeros, with or without extensions; the last chunk still ends the body."""
    reads = []
    for i, c in enumerate(chunks):
        size = (f"{len(c):X}" if upper else f"{len(c):x}").encode()
        ext = b";name=value" if exts[i % len(exts)] else b""
        reads.append(b"0" * zeros + size + ext + b"\r\n" + c + b"\r\n")
    reads.append(b"0\r\n\r\n")  # the last chunk
    dec = _ChunkedDecoder()
    got = [dec.feed(r) for r in reads]
    assert got[:-1] == chunks  # one read, one chunk's data
    assert got[-1] == b"" and dec.done and dec.leftover == b""


def test_decoder_one_read_that_looks_like_one_chunk_but_is_not() -> None:
    """Reads the shortcut must leave to the general loop: a wrong size, a missing CRLF, a
    size with blanks, the last chunk, a read that holds more than one chunk."""
    for wire, body in [
        (b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),  # two chunks in one read
        (b"3 \r\nabc\r\n0\r\n\r\n", b"abc"),  # a blank after the size (h11 takes it)
    ]:
        dec = _ChunkedDecoder()
        assert dec.feed(wire) == body and dec.done
    dec = _ChunkedDecoder()
    assert dec.feed(b"4\r\nabc\r\n") == b"abc\r\n"[:4]  # the size says 4: CRLF is data
    assert not dec.done
    with pytest.raises(httpx.RemoteProtocolError):
        _ChunkedDecoder().feed(b"2\r\nabc\r\n")  # no CRLF after the 2 bytes


def test_decoder_one_byte_at_a_time() -> None:
    body = [b"data: x\r\n\r\n", b"\r\n", b"y" * 1000]
    wire = _encode(body, [True, False], [b"x: y"])
    got, dec, _ = _feed_all([wire[i : i + 1] for i in range(len(wire))])
    assert dec.done and got == b"".join(body)


@pytest.mark.parametrize("wire", [
    b"zz\r\nab\r\n",  # not hex
    b"2\r\nabXX0\r\n\r\n",  # no CRLF after the data
    b"-2\r\nab\r\n",  # sign
    b"2 2\r\nab\r\n",  # junk in the size
    b"12345678901234567\r\n",  # more than 16 hex digits
    b"2;a\nb\r\nab\r\n0\r\n\r\n",  # a bare LF in a chunk extension (h11 refuses it too)
    b"2;a=\x00\r\nab\r\n0\r\n\r\n",  # a control character in a chunk extension
    b"0;\x7f\r\n\r\n",  # ... of the last chunk
    b"0\r\nno colon\r\n\r\n",  # a trailer line that is not a field line
    b"0\r\nx y: z\r\n\r\n",  # ... nor a token before the colon
    b"0\r\nx: a\x00b\r\n\r\n",  # ... nor a valid value
    b"0\r\nx: a\r\n folded\r\n\r\n",  # an obs-fold in the trailers
])
def test_decoder_rejects_malformed_framing(wire: bytes) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _ChunkedDecoder().feed(wire)


def test_decoder_caps_the_size_line() -> None:
    dec = _ChunkedDecoder()
    for _ in range(4):
        dec.feed(b"1" * 1000)  # still under the cap: held back, nothing decoded
    with pytest.raises(httpx.RemoteProtocolError, match="too long"):
        dec.feed(b"1" * 1000)


def test_decoder_caps_the_trailer_section() -> None:
    """Short trailer lines without end: each is under the line cap, but the section is not
    (before, such a body never ended). Valid trailers are taken, and dropped, up to the cap."""
    dec = _ChunkedDecoder()
    assert dec.feed(b"5\r\nhello\r\n0\r\n") == b"hello"
    fed = 0

    def feed_lines() -> None:
        nonlocal fed
        while fed <= 2 * MAX_TRAILERS:
            dec.feed(b"x-t: 1\r\n" * 100)
            fed += 800

    with pytest.raises(httpx.RemoteProtocolError, match="trailer section too long"):
        feed_lines()
    assert MAX_TRAILERS - 800 < fed <= MAX_TRAILERS  # raised by the feed that crossed it
    dec = _ChunkedDecoder()
    lines = b"x-t: 1\r\n" * ((MAX_TRAILERS - 2) // 8)
    pad = b"x:" + b"v" * (MAX_TRAILERS - 2 - len(lines) - 4)  # the section: MAX_TRAILERS bytes
    assert dec.feed(b"0\r\n" + lines + pad + b"\r\n\r\nNEXT") == b""
    assert dec.done and dec.leftover == b"NEXT"


# -- response heads and framing ---------------------------------------------------------------


def test_parse_head_keeps_raw_names_and_reason() -> None:
    status, reason, headers, http11 = _parse_head(
        b"HTTP/1.1 201 Created\r\nContent-Type: text/event-stream\r\nX-A:  b \t")
    assert (status, reason, http11) == (201, b"Created", True)
    assert headers == [(b"Content-Type", b"text/event-stream"), (b"X-A", b"b")]


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 20 OK",
    b"HTTP/2 200 OK",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",
    b"HTTP/1.1 200 OK\r\nBad Name: 1",
    b"HTTP/1.1 200 OK\r\nNoColon",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b",
])
def test_parse_head_rejects(head: bytes) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _parse_head(head)


@pytest.mark.parametrize(("method", "status", "headers", "http11", "expect"), [
    (b"GET", 200, [(b"Content-Length", b"5")], True, ("length", 5, True)),
    (b"GET", 200, [(b"content-length", b"5, 5")], True, ("length", 5, True)),
    (b"GET", 200, [(b"Transfer-Encoding", b"chunked")], True, ("chunked", 0, True)),
    (b"GET", 200, [(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], True,
     ("chunked", 0, False)),
    (b"GET", 200, [(b"transfer-encoding", b"chunked, gzip")], True, ("close", 0, False)),
    (b"GET", 200, [], True, ("close", 0, False)),
    (b"HEAD", 200, [(b"content-length", b"5")], True, ("none", 0, True)),
    (b"GET", 204, [], True, ("none", 0, True)),
    (b"GET", 304, [(b"content-length", b"9")], True, ("none", 0, True)),
    (b"GET", 200, [(b"content-length", b"5"), (b"connection", b"close")], True,
     ("length", 5, False)),
    (b"GET", 200, [(b"content-length", b"5")], False, ("length", 5, False)),
    (b"GET", 200, [(b"content-length", b"5"), (b"connection", b"keep-alive")], False,
     ("length", 5, True)),
])
def test_framing(method: bytes, status: int, headers: list[tuple[bytes, bytes]], http11: bool,
                 expect: tuple[str, int, bool]) -> None:
    assert _framing(method, status, headers, http11) == expect


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"5"), (b"content-length", b"6")],
    [(b"content-length", b"-1")],
    [(b"content-length", b"0x10")],
])
def test_framing_rejects_bad_lengths(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _framing(b"GET", 200, headers, True)


# -- against raw loopback servers -------------------------------------------------------------

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


class RawServer:
    """Accepts connections and runs ``handler(stream, connection_number)`` on each."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.closed_at: list[float] = []
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[RawServer]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def one(stream: trio.SocketStream) -> None:
            self.accepted += 1
            try:
                await self.handler(stream, self.accepted)
            except trio.BrokenResourceError:
                pass

        task_status.started(self)
        await trio.serve_listeners(one, listeners)


async def read_request(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
            while len(rest) < n:
                rest += await stream.receive_some(65536)
    return buf


async def start(nursery: trio.Nursery, handler: Handler) -> RawServer:
    server: RawServer = await nursery.start(RawServer(handler).run)
    return server


async def body_until_error(port: int, match: str | None = None) -> bytes:
    """GET ``/`` on ``port`` through :class:`FastTransport`; the body bytes that came out
    before the ``RemoteProtocolError`` the test expects (``match``: its message)."""
    got = bytearray()

    async def read_all(r: httpx.Response) -> None:
        async for piece in r.aiter_raw():
            got.extend(piece)

    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client, \
                client.stream("GET", f"http://127.0.0.1:{port}/") as r:
            with pytest.raises(httpx.RemoteProtocolError, match=match):
                await read_all(r)
    return bytes(got)


async def test_request_bytes_and_keep_alive_reuse(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while True:
            req = await read_request(stream)
            if not req:
                return
            seen.append(req)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n")

    server = await start(nursery, handler)
    transport = FastTransport()
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                r = await client.post(f"http://127.0.0.1:{server.port}/p/a?q=1",
                                      content=b'{"k": 1}', headers={"X-Custom": "v"})
                assert r.status_code == 200 and r.content == b"abcde"
    assert server.accepted == 1  # one connection, kept alive
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /p/a?q=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"X-Custom: v" in lines and b"Content-Length: 8" in lines
    assert body == b'{"k": 1}'


async def test_connection_close_and_stale_connections_are_not_reused(
    nursery: trio.Nursery,
) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        extra = b"Connection: close\r\n" if n == 1 else b""
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra +
                              b"\r\nok")
        if n == 2:
            # Keep-alive promised, then closed while idle: the next request must not use it.
            await stream.aclose()
            return
        await read_request(stream)

    server = await start(nursery, handler)
    url = f"http://127.0.0.1:{server.port}/"
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client:
            for _ in range(3):
                assert (await client.get(url)).content == b"ok"
                await trio.sleep(0.05)  # let the server's close arrive
    assert server.accepted == 3


async def test_an_ip_literal_is_resolved_once_a_name_for_every_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request here opens a new connection (``Connection: close``): an IP-literal
    host's address comes from getaddrinfo once (it cannot change), a name's is looked up
    again for each connection (DNS may move it)."""
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                              b"Connection: close\r\n\r\nok")

    looked_up: list[str] = []
    real = trio.socket.getaddrinfo

    async def spy(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return await real(host, port, *args, **kwargs)

    server = await start(nursery, handler)  # (its listener's own lookup not counted)
    monkeypatch.setattr(trio.socket, "getaddrinfo", spy)
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client:
            for host in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "localhost", "localhost"):
                r = await client.get(f"http://{host}:{server.port}/")
                assert r.content == b"ok"
    assert server.accepted == 5
    assert looked_up == ["127.0.0.1", "localhost", "localhost"]


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_body_cut_short_yields_the_bytes_then_fails(
    nursery: trio.Nursery, framing: str
) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        if framing == "chunked":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n5\r\nwor")
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhellowor")
        await stream.aclose()

    server = await start(nursery, handler)
    got = await body_until_error(server.port)
    assert got == b"hellowor"


async def test_endless_trailers_end_the_body_with_an_error(nursery: trio.Nursery) -> None:
    """An upstream that sends trailer lines for ever: the body ends at the trailer section's
    cap with ``RemoteProtocolError``, after the chunk data, instead of staying open."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n")
        while True:
            await stream.send_all(b"x-t: 1\r\n" * 100)
            await trio.sleep(0.001)

    server = await start(nursery, handler)
    got = await body_until_error(server.port, "trailer section too long")
    assert got == b"hello"


async def test_close_delimited_body_and_informational_responses(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                              b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil ")
        await stream.send_all(b"the close")
        await stream.aclose()

    server = await start(nursery, handler)
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client:
            r = await client.get(f"http://127.0.0.1:{server.port}/")
    assert r.status_code == 200 and r.headers["x-a"] == "1"
    assert r.content == b"until the close"
    assert r.extensions["http_version"] == b"HTTP/1.0"


async def test_pool_exhausted_is_a_fast_pool_timeout(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await release.wait()
        await stream.send_all(b"0\r\n\r\n")
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await read_request(stream)

    server = await start(nursery, handler)
    url = f"http://127.0.0.1:{server.port}/"
    transport = FastTransport(max_connections=1)
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=transport,
                                     timeout=httpx.Timeout(None, pool=0.2)) as client:
            async with client.stream("GET", url) as first:
                t0 = trio.current_time()
                with pytest.raises(httpx.PoolTimeout):
                    await client.get(url)
                assert trio.current_time() - t0 < 1.0
                release.set()
                await first.aread()
            # The connection came back: the next request reuses it.
            assert (await client.get(url)).status_code == 200
    assert server.accepted == 1


async def test_leaving_early_closes_the_upstream_connection(nursery: trio.Nursery) -> None:
    eof = trio.Event()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"1\r\na\r\n")
        while await stream.receive_some(100):
            pass
        eof.set()

    server = await start(nursery, handler)
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client:
            with trio.move_on_after(0.1):  # cancelled while waiting for the next chunk
                async with client.stream("GET", f"http://127.0.0.1:{server.port}/") as r:
                    async for _ in r.aiter_raw():
                        pass
            await eof.wait()


async def test_connect_refused_and_read_timeout(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    server = await start(nursery, silent)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    closed_port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=FastTransport()) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed_port}/")
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{server.port}/", timeout=0.2)


async def test_other_schemes_go_to_the_fallback() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"fallback " + request.url.scheme.encode())

    transport = FastTransport(fallback=httpx.MockTransport(answer))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.get("https://example.invalid/")
    assert r.content == b"fallback https"
    async with httpx.AsyncClient(transport=FastTransport()) as client:
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("https://example.invalid/")


async def test_idle_bookkeeping_stays_one_entry_per_idle_connection(
    nursery: trio.Nursery,
) -> None:
    """Sequential requests reuse one connection; the idle order must not grow with them (it
    once kept a stale entry per release, and every release then rescanned thousands)."""
    async def handler(stream: trio.SocketStream, n: int) -> None:
        while await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await start(nursery, handler)
    transport = FastTransport(max_keepalive=4)
    with trio.fail_after(20):
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(300):
                r = await client.get(f"http://127.0.0.1:{server.port}/")
                assert r.content == b"ok"
                assert len(transport._idle_order) == transport._n_idle == 1
            # Two at once: two connections, both idle after, evicted oldest first.
            async with trio.open_nursery() as inner:
                for _ in range(2):
                    inner.start_soon(client.get, f"http://127.0.0.1:{server.port}/")
            assert len(transport._idle_order) == transport._n_idle == 2
            oldest = next(iter(transport._idle_order))
            assert transport._evict_one_idle()
            assert oldest not in transport._idle_order and transport._n_idle == 1
    assert server.accepted == 2
