"""FAULTS rows 15, 16 and 17 against a real keepstream: smuggling and header abuse, SSRF
attempts, request body abuse (invariants I8 and I9).

Every test runs keepstream (in-process with ``run_keepstream``, or ``keepstream serve`` as a
subprocess where the process itself is measured or must survive) in front of the fake upstream
and a *canary* (the toolkit's ``canary`` fixture): a loopback listener that no request may ever
reach. Requests are raw bytes sent by the toolkit's ``chaos_request(port, raw_request=...,
read_after=s)``, which also reports whether the server ended the connection after its answer
(``closed_by_peer``) and what followed that answer (``after``: a second answer means that bytes
after a refused request were parsed as a request of their own: smuggling).

A refused vector (row 15 corpus, row 16 corpus) must:

* answer one of the vector's statuses (400/403/405/413/431/501, 404 for no route);
* reach nothing: no TCP connection to the upstream, none to the canary, no stream started;
* end its connection after the answer, and never serve a request pipelined behind it.

An accepted vector must answer 2xx after exactly one upstream request, to the route's upstream
(its own ``Host``), with no hop-by-hop header and no header named in ``Connection``.

Where keepstream accepts what the FAULTS row lists as an attack, the vector says why
(``why=``): obs-fold and bare LF are RFC 9112 options h11 takes (unfold, accept LF), and the
body is re-framed upstream, so no two parsers can disagree on it. ``docs/security.md`` has the
model. Test rules: loopback only, port 0, every network wait bounded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream._rules import HOP_BY_HOP
from keepstream.testing import (
    Canary,
    FakeResponseSpec,
    FakeUpstream,
    RunningKeepstream,
    chaos_request,
    run_keepstream,
    run_keepstream_process,
)

from .test_lifecycle import Server, write_config

#: A request pipelined behind every refused vector: it must never be served.
FOLLOW = b"GET /pipelined HTTP/1.1\r\nHost: x\r\n\r\n"
CAP = 64 * 1024  # server.max_body_bytes for the row 15 corpus


# -- configs and raw requests ----------------------------------------------------------------------


def corpus_config(upstream: str, journal_url: str, **server: Any) -> Config:
    """Row 15: one catch-all route; a small body cap; short body and keep-alive timeouts."""
    base = ServerConfig(bind="127.0.0.1:0", drain_timeout=2.0, stop_grace=10.0,
                        max_body_bytes=CAP, body_idle_timeout=1.0)
    return Config(
        routes=(Route(prefix="/", upstream=upstream),),
        server=dataclasses.replace(base, **server),
        journal=JournalConfig(url=journal_url, flush_interval_ms=20),
    )


def ssrf_config(upstream: str, journal_url: str) -> Config:
    """Row 16: two routes and no catch-all, so a path that matches neither is a 404."""
    return Config(
        routes=(Route(prefix="/v1/", upstream=upstream + "/api/"),
                Route(prefix="/plain", upstream=upstream)),
        server=ServerConfig(bind="127.0.0.1:0", drain_timeout=2.0, stop_grace=10.0),
        journal=JournalConfig(url=journal_url, flush_interval_ms=20),
    )


def fill(raw: bytes, canary: Canary, upstream: FakeUpstream) -> bytes:
    return raw.replace(b"{canary}", str(canary.port).encode()).replace(
        b"{upstream}", str(upstream.port).encode())


def req(*lines: str | bytes, body: bytes = b"") -> bytes:
    """A request from its lines (request line first), CRLF-terminated, then ``body``."""
    parts = [line.encode("latin-1") if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(parts) + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"


# -- row 15: smuggling and header abuse --------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """One raw request. ``refused``: the statuses it may get, and then nothing may reach the
    upstream; empty: it is served, and the upstream must get exactly ``method target`` with
    ``body``, the ``sent`` headers and none of ``not_sent``."""

    id: str
    raw: bytes
    refused: tuple[int, ...] = ()
    method: str = "POST"
    target: str = "/echo"
    body: bytes = b""
    sent: tuple[tuple[bytes, bytes], ...] = ()
    not_sent: tuple[bytes, ...] = ()
    closes: bool = False  # served: the server must end the connection after the answer
    why: str = ""
    #: Under the lean engine (``server.engine = "lean"``) refused with these instead.
    lean_refused: tuple[int, ...] = ()


BAD = (400,)
NOT_IMPLEMENTED = (501,)
TOO_LARGE = (431,)
POST = "POST /echo HTTP/1.1"
GET = "GET /x HTTP/1.1"
HELLO = chunk(b"hello") + END
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"

SMUGGLING: list[Vector] = [
    # Content-Length and Transfer-Encoding together (RFC 9112 6.1: reject, then close).
    Vector("cl-te", req(POST, "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked",
                        body=END), BAD),
    Vector("te-cl", req(POST, "Host: a", "Transfer-Encoding: chunked", "Content-Length: 5",
                        body=END), BAD),
    Vector("cl-te-lowercase", req(POST, "Host: a", "content-length: 5",
                                  "transfer-encoding: chunked", body=END), BAD),
    Vector("cl-te-uppercase", req(POST, "Host: a", "CONTENT-LENGTH: 5",
                                  "TRANSFER-ENCODING: CHUNKED", body=END), BAD),
    Vector("cl-te-mixed-case-value", req(POST, "Host: a", "Content-Length: 5",
                                         "Transfer-Encoding: ChUnKeD", body=END), BAD),
    Vector("cl0-te-with-smuggled-chunk", req(POST, "Host: a", "Content-Length: 0",
                                             "Transfer-Encoding: chunked",
                                             body=chunk(SMUGGLED) + END), BAD),
    Vector("cl-te-obs-folded", req(POST, "Host: a", "Content-Length: 5", "Transfer-Encoding:",
                                   " chunked", body=END), BAD),
    # Transfer-Encoding variants: only a lone "chunked" is accepted.
    Vector("te-obs-fold", req(POST, "Host: a", "Transfer-Encoding:", " chunked", body=HELLO),
           body=b"hello", not_sent=(b"transfer-encoding",),
           why="h11 unfolds obs-fold (RFC 9112 5.2) before anyone reads the value"),
    Vector("te-tab", req(POST, "Host: a", "Transfer-Encoding:\tchunked", body=HELLO),
           body=b"hello", not_sent=(b"transfer-encoding",), why="HTAB is optional whitespace"),
    Vector("te-gzip-chunked", req(POST, "Host: a", "Transfer-Encoding: gzip, chunked",
                                  body=END), NOT_IMPLEMENTED),
    Vector("te-chunked-gzip", req(POST, "Host: a", "Transfer-Encoding: chunked, gzip",
                                  body=END), NOT_IMPLEMENTED),
    Vector("te-chunked-chunked", req(POST, "Host: a", "Transfer-Encoding: chunked, chunked",
                                     body=END), NOT_IMPLEMENTED),
    Vector("te-two-headers", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                 "Transfer-Encoding: chunked", body=END), NOT_IMPLEMENTED),
    Vector("te-space-before-colon", req(POST, "Host: a", "Transfer-Encoding : chunked",
                                        body=END), BAD),
    Vector("te-xchunked", req(POST, "Host: a", "Transfer-Encoding: xchunked", body=END),
           NOT_IMPLEMENTED),
    Vector("te-quoted", req(POST, "Host: a", 'Transfer-Encoding: "chunked"', body=END),
           NOT_IMPLEMENTED),
    Vector("te-identity", req(POST, "Host: a", "Transfer-Encoding: identity"), NOT_IMPLEMENTED),
    Vector("te-empty", req(POST, "Host: a", "Transfer-Encoding:", body=END), NOT_IMPLEMENTED),
    Vector("te-trailing-comma", req(POST, "Host: a", "Transfer-Encoding: chunked,", body=END),
           NOT_IMPLEMENTED),
    Vector("te-vertical-tab", req(POST, "Host: a", "Transfer-Encoding: \x0bchunked", body=END),
           BAD),
    Vector("te-nbsp", req(POST, "Host: a", b"Transfer-Encoding: \xa0chunked", body=END),
           NOT_IMPLEMENTED),
    Vector("te-in-http-1.0", req("POST /echo HTTP/1.0", "Transfer-Encoding: chunked",
                                 body=END), BAD),
    # Content-Length variants.
    Vector("cl-duplicate-differing", req(POST, "Host: a", "Content-Length: 1",
                                         "Content-Length: 2", body=b"ab"), BAD),
    Vector("cl-list-differing", req(POST, "Host: a", "Content-Length: 1, 2", body=b"ab"), BAD),
    Vector("cl-plus", req(POST, "Host: a", "Content-Length: +1", body=b"a"), BAD),
    Vector("cl-minus-one", req(POST, "Host: a", "Content-Length: -1", body=b"a"), BAD),
    Vector("cl-inner-space", req(POST, "Host: a", "Content-Length: 1 1", body=b"a"), BAD),
    Vector("cl-hex", req(POST, "Host: a", "Content-Length: 0x1", body=b"a"), BAD),
    Vector("cl-empty", req(POST, "Host: a", "Content-Length:", body=b"a"), BAD),
    Vector("cl-exponent", req(POST, "Host: a", "Content-Length: 1e1", body=b"a"), BAD),
    Vector("cl-twenty-digits", req(POST, "Host: a", "Content-Length: " + "9" * 20, body=b"a"),
           (400, 413)),
    Vector("cl-over-the-cap", req(POST, "Host: a", f"Content-Length: {CAP + 1}"), (413,)),
    Vector("cl-duplicate-same", req(POST, "Host: a", "Content-Length: 5", "Content-Length: 5",
                                    body=b"hello"), body=b"hello",
           why="equal values are one length (RFC 9112 6.3)"),
    Vector("cl-leading-zeros", req(POST, "Host: a", "Content-Length: 0005", body=b"hello"),
           body=b"hello"),
    # Line ends and folding.
    Vector("bare-lf", b"POST /echo HTTP/1.1\nHost: a\nContent-Length: 5\n\nhello", body=b"hello",
           why="RFC 9112 2.2 lets a recipient accept LF; h11 does, and frames it the same"),
    Vector("bare-cr-line-ends", b"GET /x HTTP/1.1\rHost: a\r\r\n\r\n", BAD),
    Vector("bare-cr-in-request-line", b"GET /x\rHTTP/1.1\r\nHost: a\r\n\r\n", BAD),
    Vector("obs-fold-continuation", req(GET, "Host: a", "X-Folded: a", " b", "\tc"),
           method="GET", target="/x", sent=((b"x-folded", b"a b c"),),
           why="h11 replaces obs-fold with a space (RFC 9112 5.2)"),
    Vector("obs-fold-first-header-line", req(GET, " X-A: b", "Host: a"), BAD),
    # Header bytes.
    Vector("nul-in-value", req(GET, "Host: a", "X-A: b\x00c"), BAD),
    Vector("cr-in-value", req(GET, "Host: a", "X-A: b\rc"), BAD),
    Vector("lf-in-value", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\nc\r\n\r\n", BAD),
    Vector("nul-in-name", req(GET, "Host: a", "X-\x00A: b"), BAD),
    Vector("space-in-name", req(GET, "Host: a", "X A: b"), BAD),
    Vector("paren-in-name", req(GET, "Host: a", "X(A): b"), BAD),
    Vector("empty-name", req(GET, "Host: a", ": b"), BAD),
    Vector("non-ascii-name", req(GET, "Host: a", b"X-\xe9: b"), BAD),
    Vector("no-colon", req(GET, "Host: a", "X-A b"), BAD),
    Vector("name-ends-at-first-colon", req(GET, "Host: a", "X:A: b"), method="GET",
           target="/x", sent=((b"x", b"A: b"),), why="a plain header named X"),
    # Sizes: h11_max_incomplete_size is 16 KiB, server.max_headers 100.
    Vector("header-17k-in-one-read", req(GET, "Host: a", "X-Big: " + "a" * 17 * 1024),
           TOO_LARGE),
    Vector("header-70k", req(GET, "Host: a", "X-Big: " + "a" * 70 * 1024), TOO_LARGE),
    Vector("headers-101", req(GET, *(f"X-H{i}: v" for i in range(100)), "Host: a"),
           TOO_LARGE),
    Vector("headers-200", req(GET, *(f"X-H{i}: v" for i in range(199)), "Host: a"),
           TOO_LARGE),
    Vector("target-17k", req("GET /" + "a" * 17 * 1024 + " HTTP/1.1", "Host: a"), TOO_LARGE),
    # Request lines.
    Vector("http-0.9", b"GET /x\r\n\r\n", BAD),
    Vector("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", BAD),
    Vector("double-space", req("GET  /x HTTP/1.1", "Host: a"), BAD),
    Vector("trailing-space", req("GET /x HTTP/1.1 ", "Host: a"), BAD),
    Vector("slash-in-method", req("GE/T /x HTTP/1.1", "Host: a"), BAD),
    Vector("absolute-form", req("GET http://127.0.0.1:{canary}/x HTTP/1.1", "Host: a"), BAD),
    Vector("connect", req("CONNECT 127.0.0.1:{canary} HTTP/1.1", "Host: a"), (405,)),
    Vector("options-asterisk", req("OPTIONS * HTTP/1.1", "Host: a"), BAD),
    Vector("get-asterisk", req("GET * HTTP/1.1", "Host: a"), BAD),
    Vector("http-2.0-over-http1", req("GET /x HTTP/2.0", "Host: a"), method="GET",
           target="/x", why="h11 takes any 1-digit version and answers as HTTP/1.1; the lean "
           "engine answers 505 to any version but 1.0 and 1.1", lean_refused=(505,)),
    Vector("lowercase-method", req("get /x HTTP/1.1", "Host: a"), method="GET", target="/x",
           why="Hypercorn upper-cases the method; nothing else changes"),
    # Connection and hop-by-hop headers.
    Vector("connection-close-x-secret",
           req(GET, "Host: a", "Connection: close, X-Secret", "X-Secret: s3cret", "X-Kept: 1"),
           method="GET", target="/x", sent=((b"x-kept", b"1"),),
           not_sent=(b"x-secret", b"connection"), closes=True),
    Vector("connection-names-authorization",
           req(GET, "Host: a", "Connection: keep-alive, Authorization", "Authorization: k"),
           method="GET", target="/x", not_sent=(b"authorization", b"connection")),
    Vector("connection-names-x-forwarded-for",
           req(GET, "Host: a", "Connection: X-Forwarded-For", "X-Forwarded-For: 10.0.0.1"),
           method="GET", target="/x", not_sent=(b"x-forwarded-for",)),
    Vector("hop-by-hop-headers",
           req(GET, "Host: a", "Keep-Alive: timeout=5", "TE: trailers", "Trailer: X-T",
               "Upgrade: foo/1", "Proxy-Authorization: Basic eA==", "Proxy-Connection: close"),
           method="GET", target="/x", why="served; none of them is forwarded"),
    # Host.
    Vector("host-twice", req(GET, "Host: a", "Host: 127.0.0.1:{canary}"), BAD),
    Vector("host-missing", req(GET), BAD),
    Vector("host-empty", req(GET, "Host:"), method="GET", target="/x",
           why="Host is never forwarded: the upstream gets its own"),
    Vector("host-userinfo", req(GET, "Host: u:p@127.0.0.1:{canary}"), method="GET",
           target="/x", why="Host is never forwarded: the upstream gets its own"),
    # Chunked framing.
    Vector("chunk-size-overflow",
           req(POST, "Host: a", "Transfer-Encoding: chunked",
               body=b"ffffffffffffffffffff\r\n" + b"a" * (CAP + 1024)), (413,)),
    Vector("chunk-size-21-digits", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                       body=b"0" * 20 + b"1\r\na\r\n" + END), BAD),
    Vector("chunk-size-negative", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                      body=b"-1\r\na\r\n" + END), BAD),
    Vector("chunk-size-0x", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                body=b"0x1\r\na\r\n" + END), BAD),
    Vector("chunk-longer-than-its-size", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                             body=b"1\r\nabc\r\n" + END), BAD),
    Vector("chunk-extension", req(POST, "Host: a", "Transfer-Encoding: chunked",
                                  body=b"5;name=value\r\nhello\r\n" + END), body=b"hello"),
    Vector("trailer-injection",
           req(POST, "Host: a", "Transfer-Encoding: chunked",
               body=chunk(b"hello") + b"0\r\nX-Injected: 1\r\nContent-Length: 99\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"),
           body=b"hello", not_sent=(b"x-injected", b"transfer-encoding"),
           sent=((b"content-length", b"5"),)),
    Vector("get-body-holding-a-request",
           req(GET, "Host: a", f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED),
           method="GET", target="/x", body=SMUGGLED),
    Vector("expect-100-continue", req(POST, "Host: a", "Expect: 100-continue",
                                      "Content-Length: 5", body=b"hello"), body=b"hello"),
    # Not HTTP for the upstream.
    Vector("websocket-upgrade",
           req(GET, "Host: a", "Connection: Upgrade", "Upgrade: websocket",
               "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
           (403, 400)),  # 400: Hypercorn refuses bytes pipelined after a WebSocket handshake
]


def test_corpus_size_and_ids() -> None:
    assert len(SMUGGLING) >= 50
    assert sum(bool(v.refused) for v in SMUGGLING) >= 50
    assert len({v.id for v in SMUGGLING}) == len(SMUGGLING)
    assert all(v.why or v.refused or v.not_sent or v.sent or v.body for v in SMUGGLING)


def assert_nothing_reached(ks: RunningKeepstream, upstream: FakeUpstream, canary: Canary) -> None:
    assert upstream.connections_seen == 0 and upstream.exchanges == []
    assert canary.connections == 0
    assert ks.proxy.supervisor.started_total == 0


def assert_forwarded_cleanly(ex: Any, upstream: FakeUpstream) -> None:
    """Only end-to-end headers, and the upstream's own Host."""
    names = [k.lower() for k, _ in ex.request_headers]
    assert not set(names) & HOP_BY_HOP, names
    assert ex.header("host") == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("vector", SMUGGLING, ids=[v.id for v in SMUGGLING])
async def test_row15_smuggling_and_header_abuse(
    vector: Vector, fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    raw = fill(vector.raw, canary, fake_upstream)
    with trio.fail_after(30):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            refused = vector.refused
            if ks.config.server.engine == "lean" and vector.lean_refused:
                refused = vector.lean_refused
            if refused:
                alone = await chaos_request(ks.port, raw_request=raw, read_after=2.0)
                assert alone.status in refused, (alone.status, alone.error, alone.body)
                assert alone.closed_by_peer, "the connection stays open after a refusal"
                assert alone.after == b""
                # The same bytes with a request pipelined behind: that one is never served.
                # (Hypercorn may lose the answer itself when it closes with bytes still
                # buffered: then no status, but still nothing served.)
                piped = await chaos_request(ks.port, raw_request=raw + FOLLOW, read_after=2.0)
                assert piped.status in (*refused, None), piped.status
                assert piped.closed_by_peer and b"HTTP/1.1" not in piped.after, \
                    piped.after[:200]
                assert_nothing_reached(ks, fake_upstream, canary)
                return
            reply = await chaos_request(ks.port, raw_request=raw,
                                        read_after=2.0 if vector.closes else 0.0)
            assert reply.status == 200 and reply.complete, (reply.status, reply.error)
            if vector.closes:
                assert reply.closed_by_peer, "Connection: close, but the connection stays open"
    assert canary.connections == 0
    (ex,) = fake_upstream.exchanges
    assert (ex.request_method, ex.request_target) == (vector.method, vector.target)
    assert ex.request_body == vector.body
    assert_forwarded_cleanly(ex, fake_upstream)
    got = [(k.lower(), v) for k, v in ex.request_headers]
    for pair in vector.sent:
        assert pair in got, (pair, got)
    for name in vector.not_sent:
        assert name not in {k for k, _ in got}, (name, got)


async def test_row15_pipelined_refusal_after_a_served_request(
    fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    """A served request with an absolute-form one pipelined behind it: the second is refused
    (after the first was answered) and the connection ends there. With a third request behind
    the refused one, that third one is never served."""
    served = req(GET, "Host: a")
    refused = fill(req("GET http://127.0.0.1:{canary}/ HTTP/1.1", "Host: a"), canary,
                   fake_upstream)
    with trio.fail_after(20):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            two = await chaos_request(ks.port, raw_request=served + refused, read_after=2.0)
            three = await chaos_request(
                ks.port, raw_request=served + refused + req("GET /third HTTP/1.1", "Host: a"),
                read_after=2.0)
    assert two.status == 200 and two.complete
    assert two.after.startswith(b"HTTP/1.1 400 ") and two.after.count(b"HTTP/1.1 ") == 1
    assert two.closed_by_peer
    assert three.status == 200 and three.closed_by_peer
    assert three.after.count(b"HTTP/1.1 ") <= 1 and b"HTTP/1.1 200" not in three.after
    assert [ex.request_target for ex in fake_upstream.exchanges] == ["/x", "/x"]
    assert canary.connections == 0


@pytest.mark.parametrize("raw", [
    req(GET, "Host: a", "Connection: close"),
    req("GET /x HTTP/1.0"),
    req("POST /echo HTTP/1.0", "Content-Length: 5", body=b"hello"),
], ids=["connection-close", "http-1.0", "http-1.0-post"])
async def test_row15_connection_ends_after_a_response_that_closes_it(
    raw: bytes, fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """``Connection: close`` (or HTTP/1.0) on a proxied route: after the whole answer the
    server ends the connection, as Hypercorn does on its own for any other app."""
    with trio.fail_after(20):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            reply = await chaos_request(ks.port, raw_request=raw, read_after=3.0)
    assert reply.status == 200 and reply.complete
    assert reply.closed_by_peer, "the server never closed the connection"


async def test_row15_idle_keep_alive_connection_is_closed_after_a_proxied_response(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """The keep-alive timeout also applies to a connection whose last request was proxied (an
    idle connection is not held forever)."""
    cfg = corpus_config(fake_upstream.url, journal_url, keep_alive_timeout=0.5)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            admin = await chaos_request(
                ks.port, raw_request=req("GET /_keepstream/healthz HTTP/1.1", "Host: a"),
                read_after=3.0)
            proxied = await chaos_request(ks.port, raw_request=req(GET, "Host: a"),
                                          read_after=3.0)
    assert admin.status == 200 and admin.closed_by_peer  # the baseline: Hypercorn's own timeout
    assert proxied.status == 200 and proxied.complete
    assert proxied.closed_by_peer, "an idle keep-alive connection outlived keep_alive_timeout"


async def _h11_exchange(stream: trio.SocketStream, target: str) -> tuple[h11.Connection, int]:
    """One request on ``stream``, read to the end of its response: (the client's h11 state,
    the status)."""
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target=target,
                                                headers=[("Host", "a")])) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        if isinstance(event, h11.EndOfMessage):
            return conn, status
        assert not isinstance(event, h11.ConnectionClosed), "closed before the response ended"


async def test_keep_alive_ends_once_a_drain_cuts_its_streams(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """Once a drain cuts the streams still live (its deadline passed), keep-alive ends: a
    connection kept alive before is closed by the server after its next response (not kept
    for ``keep_alive_timeout``, 75 s here), and a new connection is still answered (readiness
    503, draining), then closed."""
    cfg = corpus_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            kept = await trio.open_tcp_stream("127.0.0.1", ks.port)
            _, status = await _h11_exchange(kept, "/_keepstream/healthz")
            assert status == 200
            sup = ks.proxy.supervisor
            sup.begin_drain()
            assert not sup.cutting.is_set()
            again, status = await _h11_exchange(kept, "/_keepstream/readyz")
            assert status == 503 and again.our_state is h11.DONE  # still kept alive
            sup.interrupt_all()  # what the drain does at its deadline
            assert sup.cutting.is_set()
            for stream in (kept, await trio.open_tcp_stream("127.0.0.1", ks.port)):
                _, status = await _h11_exchange(stream, "/_keepstream/readyz")
                assert status == 503
                with trio.fail_after(5):
                    assert await stream.receive_some(65536) == b""  # closed by the server
                await stream.aclose()


# -- row 16: SSRF ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A request trying to reach somewhere else. ``refused``: its statuses; else it is served
    by a route, and the upstream must get ``target`` (on its own origin, never the canary)."""

    id: str
    raw: bytes
    refused: tuple[int, ...] = ()
    target: str = ""


def get(target: str, *headers: str) -> bytes:
    return req(f"GET {target} HTTP/1.1", *(headers or ("Host: a",)))


C = "127.0.0.1:{canary}"
SSRF: list[Attempt] = [
    Attempt("absolute-form", get(f"http://{C}/x", f"Host: {C}"), BAD),
    Attempt("absolute-form-no-path", get(f"http://{C}"), BAD),
    Attempt("absolute-form-https", get(f"https://{C}/v1/x"), BAD),
    Attempt("absolute-form-upper-scheme", get(f"HTTP://{C}/v1/"), BAD),
    Attempt("absolute-form-to-the-upstream-itself", get("http://127.0.0.1:{upstream}/v1/x"), BAD),
    Attempt("absolute-form-userinfo", get(f"http://127.0.0.1:{{upstream}}@{C}/v1/x"), BAD),
    Attempt("absolute-form-ipv6-mapped", get("http://[::ffff:127.0.0.1]:{canary}/"), BAD),
    Attempt("scheme-one-slash", get(f"http:/{C}/v1/x"), BAD),
    Attempt("authority-form-get", get(C), BAD),
    Attempt("connect-authority", req(f"CONNECT {C} HTTP/1.1", f"Host: {C}"), (405,)),
    Attempt("connect-origin-form", req("CONNECT /v1/x HTTP/1.1", "Host: a"), (405,)),
    Attempt("options-asterisk", req("OPTIONS * HTTP/1.1", "Host: a"), BAD),
    Attempt("network-path", get(f"//{C}/x"), BAD),
    Attempt("network-path-three-slashes", get(f"///{C}/x"), BAD),
    Attempt("at-sign-target", get(f"@{C}/v1/x"), BAD),
    Attempt("backslash-authority", get(f"/\\{C}/x"), BAD),
    Attempt("backslash-dot-dot", get("/v1\\..\\..\\x"), BAD),
    Attempt("encoded-backslashes", get(f"/v1/%5c%5c{C}/x"), BAD),
    Attempt("dot-dot", get("/v1/../plain/x"), BAD),
    Attempt("dot-dot-encoded", get("/v1/%2e%2e/x"), BAD),
    Attempt("dot-dot-encoded-upper", get("/v1/%2E%2E/x"), BAD),
    Attempt("dot-dot-half-encoded", get("/v1/.%2e/x"), BAD),
    Attempt("dot-dot-encoded-slashes", get("/v1/..%2f..%2fx"), BAD),
    Attempt("dot-dot-semicolon", get("/v1/..;/x"), BAD),
    Attempt("dot-segment", get("/v1/./x"), BAD),
    Attempt("fullwidth-dots-raw", get(b"/v1/\xef\xbc\x8e\xef\xbc\x8e/x".decode("latin-1")), BAD),
    Attempt("ipv6-literal-in-path", get("/v1/[::1]:{canary}/x"), BAD),
    Attempt("fragment", get(f"/v1/x#@{C}"), BAD),
    Attempt("encoded-crlf-host", get(f"/v1/x%0d%0aHost:%20{C}"), BAD),
    Attempt("encoded-nul", get("/v1/x%00"), BAD),
    Attempt("host-twice", get("/v1/x", "Host: a", f"Host: {C}"), BAD),
    Attempt("at-after-prefix", get(f"/v1@{C}/x"), (404,)),
    Attempt("at-after-plain", get(f"/plain@{C}"), (404,)),
    Attempt("dot-after-plain", get("/plain.127.0.0.1/x"), (404,)),
    Attempt("no-route", get("/elsewhere"), (404,)),
    # Served, and only ever by the route's upstream: the path is forwarded byte for byte.
    Attempt("double-encoded-dots", get("/v1/%252e%252e/x"), target="/api/%252e%252e/x"),
    Attempt("double-encoded-slash", get(f"/v1/%252f{C}/x"),
            target="/api/%252f127.0.0.1:{canary}/x"),
    Attempt("fullwidth-dots-encoded", get("/v1/%EF%BC%8E%EF%BC%8E/x"),
            target="/api/%EF%BC%8E%EF%BC%8E/x"),
    Attempt("userinfo-in-path", get(f"/v1/u:p@{C}/x"), target="/api/u:p@127.0.0.1:{canary}/x"),
    Attempt("encoded-at", get(f"/v1/%40{C}"), target="/api/%40127.0.0.1:{canary}"),
    Attempt("route-then-network-path", get(f"/v1//{C}/x"), target="/api//127.0.0.1:{canary}/x"),
    Attempt("url-in-query", get(f"/v1/x?next=http://{C}/"),
            target="/api/x?next=http://127.0.0.1:{canary}/"),
    Attempt("dot-dot-in-query", get("/v1/x?../../admin"), target="/api/x?../../admin"),
    Attempt("host-is-the-canary", get("/v1/x", f"Host: {C}"), target="/api/x"),
    Attempt("host-userinfo", get("/plain/x", f"Host: u@{C}"), target="/x"),
    Attempt("forwarded-host-headers",
            get("/v1/x", "Host: a", f"X-Forwarded-Host: {C}", f"Forwarded: host={C}"),
            target="/api/x"),
]


def test_ssrf_corpus_size() -> None:
    assert len(SSRF) >= 30 and sum(bool(a.refused) for a in SSRF) >= 30
    assert len({a.id for a in SSRF}) == len(SSRF)


@pytest.mark.parametrize("attempt", SSRF, ids=[a.id for a in SSRF])
async def test_row16_ssrf(
    attempt: Attempt, fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    raw = fill(attempt.raw, canary, fake_upstream)
    with trio.fail_after(20):
        async with run_keepstream(ssrf_config(fake_upstream.url, journal_url)) as ks:
            reply = await chaos_request(ks.port, raw_request=raw,
                                        read_after=2.0 if attempt.refused else 0.0)
            if attempt.refused:
                assert reply.status in attempt.refused, (reply.status, reply.error, reply.body)
                assert_nothing_reached(ks, fake_upstream, canary)
                return
            assert reply.status == 200 and reply.complete, (reply.status, reply.body)
    assert canary.connections == 0
    (ex,) = fake_upstream.exchanges
    assert ex.request_target == attempt.target.replace("{canary}", str(canary.port))
    assert_forwarded_cleanly(ex, fake_upstream)


async def test_row16_upstream_redirect_to_the_canary_is_not_followed(
    fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    """The upstream answers 302 to the canary: the client gets that 302 with its Location; the
    canary gets no connection (httpx runs with ``follow_redirects=False``)."""
    location = f"http://127.0.0.1:{canary.port}/stolen"
    spec = FakeResponseSpec(redirect=location)
    with trio.fail_after(20):
        async with run_keepstream(ssrf_config(fake_upstream.url, journal_url)) as ks:
            res = await chaos_request(ks.port, "GET", "/v1/r", headers=spec.headers())
            assert res.status == 302 and res.complete
            assert res.header("location") == location.encode()
            sid = res.header("keepstream-id")
            assert sid is not None
            rec = await ks.wait_terminal(sid.decode())
            assert rec["status"] == "completed" and rec["upstream_status"] == 302
            await trio.sleep(0.2)  # a follow-up request would have been made by now
    assert [ex.request_target for ex in fake_upstream.exchanges] == ["/api/r"]
    assert canary.connections == 0


# -- HTTP/2: prior knowledge and h2c (Hypercorn speaks both on the plain listener) -----------


def _h2_connection() -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False,
    )
    return h2.connection.H2Connection(config=config)


async def h2_exchange(
    stream: trio.SocketStream, conn: h2.connection.H2Connection, stream_id: int, pending: bytes,
    timeout: float = 5.0,
) -> str:
    """Read until stream ``stream_id`` ends; return its ``:status``, or how it failed."""
    status = "no answer"
    data = pending
    with trio.move_on_after(timeout):
        while True:
            if data:
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
                        for name, value in ev.headers or []:
                            if name == b":status":
                                status = bytes(value).decode()
                    elif isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == stream_id:
                        return status
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == stream_id:
                        return "reset"
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return "goaway"
                await stream.send_all(conn.data_to_send())
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return "closed"
            if not data:
                return "closed"
    return "timeout"


async def h2_request(port: int, headers: list[tuple[bytes, bytes]]) -> str:
    """One request on a new prior-knowledge HTTP/2 connection."""
    conn = _h2_connection()
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(conn.data_to_send())
        return await h2_exchange(stream, conn, 1, b"")
    finally:
        await stream.aclose()


def h2_get(path: str, authority: str = "a", *extra: tuple[bytes, bytes]) -> list[
        tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority.encode()),
            (b":path", path.encode()), *extra]


async def test_row16_http2_requests_obey_the_same_rules(
    fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    c = f"127.0.0.1:{canary.port}"
    attempts: list[tuple[list[tuple[bytes, bytes]], set[str]]] = [
        (h2_get(f"http://{c}/x", c), {"400"}),
        (h2_get(f"//{c}/x"), {"400"}),
        (h2_get("/a/../x"), {"400"}),
        (h2_get("/a/%2e%2e/x"), {"400"}),
        (h2_get("*"), {"400"}),
        (h2_get("/x", "a", (b"transfer-encoding", b"chunked")), {"400", "reset", "goaway"}),
        (h2_get("/x", "a", (b"connection", b"close")), {"400", "reset", "goaway"}),
        (h2_get("/x", "a", (b"x-a", b"b\r\nx-b: c")), {"400", "reset", "goaway"}),
        (h2_get("/x", c), {"200"}),  # :authority is the canary: served by the route, not there
    ]
    with trio.fail_after(30):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            lean = ks.config.server.engine == "lean"
            for headers, want in attempts:
                got = await h2_request(ks.port, headers)
                # The lean engine speaks HTTP/1.1 only: the HTTP/2 preface is refused and
                # the connection closed, whatever follows it.
                assert got == "closed" if lean else got in want, (headers, got)
            assert ks.proxy.supervisor.started_total == (0 if lean else 1)
    if lean:
        assert fake_upstream.exchanges == [] and canary.connections == 0
        return
    (ex,) = fake_upstream.exchanges
    assert ex.request_target == "/x"
    assert_forwarded_cleanly(ex, fake_upstream)
    assert canary.connections == 0


async def test_an_http2_connection_is_not_cut_when_the_drain_ends_keep_alive(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """The end of keep-alive at a drain's cut closes HTTP/1.1 connections after a response;
    an HTTP/2 connection keeps Hypercorn's own way (it is not dropped between its streams,
    which would lose a request already in flight on it): its next stream is answered."""
    with trio.fail_after(30):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            conn = _h2_connection()
            conn.initiate_connection()
            conn.send_headers(1, h2_get("/_keepstream/healthz"), end_stream=True)
            stream = await trio.open_tcp_stream("127.0.0.1", ks.port)
            try:
                await stream.send_all(conn.data_to_send())
                first = await h2_exchange(stream, conn, 1, b"")
                if ks.config.server.engine == "lean":
                    assert first == "closed"  # HTTP/1.1 only: the preface is refused
                    return
                assert first == "200"
                sup = ks.proxy.supervisor
                sup.begin_drain()
                sup.interrupt_all()  # the drain's cut: keep-alive over
                for stream_id in (3, 5):  # the connection outlives a stream after the cut
                    conn.send_headers(stream_id, h2_get("/_keepstream/readyz"), end_stream=True)
                    await stream.send_all(conn.data_to_send())
                    assert await h2_exchange(stream, conn, stream_id, b"") == "503", stream_id
            finally:
                await stream.aclose()


async def test_row16_h2c_upgrade_obeys_the_same_rules(
    fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    """``Upgrade: h2c`` makes Hypercorn switch the connection to HTTP/2 (answering the first
    request over it). That request and the next ones still go through every rule."""
    c = f"127.0.0.1:{canary.port}"
    conn = _h2_connection()
    settings = conn.initiate_upgrade_connection()
    assert settings is not None
    head = req(f"GET http://{c}/x HTTP/1.1", "Host: a", "Connection: Upgrade, HTTP2-Settings",
               "Upgrade: h2c", b"HTTP2-Settings: " + settings)
    with trio.fail_after(30):
        async with run_keepstream(corpus_config(fake_upstream.url, journal_url)) as ks:
            stream = await trio.open_tcp_stream("127.0.0.1", ks.port)
            try:
                await stream.send_all(head)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    assert data, buf
                    buf += data
                switch, _, rest = buf.partition(b"\r\n\r\n")
                if ks.config.server.engine == "lean":
                    # No HTTP/2 there: the upgrade is ignored (RFC 9110 section 7.8 lets a
                    # server), and the request is answered, refused, over HTTP/1.1.
                    assert switch.startswith(b"HTTP/1.1 400 "), switch
                    assert b"connection: close" in switch.lower()
                    assert fake_upstream.exchanges == [] and canary.connections == 0
                    return
                assert switch.startswith(b"HTTP/1.1 101 "), switch
                await stream.send_all(conn.data_to_send())  # the client preface
                assert await h2_exchange(stream, conn, 1, rest) == "400"
                conn.send_headers(3, h2_get(f"//{c}/x"), end_stream=True)
                await stream.send_all(conn.data_to_send())
                assert await h2_exchange(stream, conn, 3, b"") == "400"
                conn.send_headers(5, h2_get("/x", c), end_stream=True)
                await stream.send_all(conn.data_to_send())
                assert await h2_exchange(stream, conn, 5, b"") == "200"
            finally:
                await stream.aclose()
    assert [ex.request_target for ex in fake_upstream.exchanges] == ["/x"]
    assert canary.connections == 0


@asynccontextmanager
async def serving(tmp_path: Path, upstream: FakeUpstream, extra_server: str = ""
                  ) -> AsyncIterator[Server]:
    """``keepstream serve`` as a subprocess (the toolkit's harness); SIGTERM, then SIGKILL after
    10 s, and reaped at the end."""
    config, _ = write_config(tmp_path, upstream.url, extra_server=extra_server)
    async with run_keepstream_process(config, workdir=tmp_path, stop_timeout=10) as server:
        yield server


WEBSOCKET_THEN_BYTES = req(
    GET, "Host: a", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", body=FOLLOW)


@pytest.mark.parametrize("attack", ["http2-connect-without-path", "websocket-then-bytes"])
async def test_row15_hypercorn_protocol_errors_end_one_connection_not_the_server(
    attack: str, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Two requests make Hypercorn 0.18's protocol code raise out of a connection: an HTTP/2
    CONNECT without ``:path`` (``UnboundLocalError``: it takes every h2 CONNECT for a WebSocket)
    and a WebSocket handshake with bytes behind it (pgjones/hypercorn#225). Each must end its
    own connection, not the ``keepstream serve`` process."""
    async with serving(tmp_path, fake_upstream) as server:
        with trio.fail_after(30):
            for _ in range(5):
                try:
                    if attack == "http2-connect-without-path":
                        got = await h2_request(server.port, [(b":method", b"CONNECT"),
                                                             (b":authority", b"127.0.0.1:1")])
                        assert got in {"reset", "goaway", "closed", "400", "405"}, got
                    else:
                        reply = await chaos_request(server.port, raw_request=WEBSOCKET_THEN_BYTES,
                                                    read_after=1.0)
                        if not (reply.error or "").startswith("connect: "):
                            assert reply.status in (None, 400, 403) and reply.closed_by_peer, \
                                (reply.status, reply.error)
                except OSError:
                    pass  # refused: the process is gone, as the next assertion says
                await trio.sleep(0.1)
                assert server.proc.returncode is None, f"{attack} stopped the server:\n" + \
                    server.stderr()[-2000:]
            res = await chaos_request(server.port, "GET", "/after")
            assert res.status == 200 and res.complete
    assert [ex.request_target for ex in fake_upstream.exchanges] == ["/after"]


# -- row 17: request body abuse ----------------------------------------------------------------

MIB = 1 << 20
BODY_CAP = 1 * MIB
HUNDRED_MIB = 100 * MIB


def _proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    """Peak RSS (bytes) of ``pid`` during the block, over its RSS when the block starts: from
    the kernel's high-water mark, reset at the start (``clear_refs`` 5), when possible."""
    out = {"base": _proc_status(pid, "VmRSS") * 1024, "peak": 0}
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        hwm = True
    except OSError:
        hwm = False
    yield out
    if hwm:
        out["peak"] = max(out["peak"], _proc_status(pid, "VmHWM") * 1024)


async def sample_rss(pid: int, out: dict[str, int]) -> None:
    """Poll VmRSS every 2 ms into ``out["peak"]`` (a fallback for the high-water mark)."""
    while True:
        out["peak"] = max(out["peak"], _proc_status(pid, "VmRSS") * 1024)
        await trio.sleep(0.002)


@dataclass
class Upload:
    status: int | None = None
    sent: int = 0
    seconds: float = 0.0
    ended: bool = False


async def upload_until_answered(port: int, *, chunked: bool, total: int = HUNDRED_MIB) -> Upload:
    """POST a ``total``-byte body (Content-Length or chunked), 64 KiB at a time, and stop
    sending as soon as an answer (or the end of the connection) arrives."""
    piece = b"x" * 65536
    if chunked:
        head = req(POST, "Host: a", "Transfer-Encoding: chunked")
        unit = chunk(piece)
    else:
        head = req(POST, "Host: a", f"Content-Length: {total}")
        unit = piece
    up = Upload()
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))

    async def send_body() -> None:
        try:
            await stream.send_all(head)
            while up.sent < total:
                await stream.send_all(unit)
                up.sent += len(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    up.ended = True
                    break
                parser.receive_data(data)
                event = parser.next_event()
                if isinstance(event, h11.Response):
                    up.status = event.status_code
                    break
            up.seconds = trio.current_time() - start
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
    return up


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_row17_100_mib_body_is_413_with_bounded_rss(
    chunked: bool, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A 100 MiB body against ``max_body_bytes`` = 1 MiB: 413 at once (Content-Length) or once
    1 MiB has arrived (chunked), without the rest being read, and keepstream's RSS grows by
    less than the cap + 5 MiB."""
    extra = f"max_body_bytes = {BODY_CAP}\nbody_idle_timeout = 5.0\n"
    async with serving(tmp_path, fake_upstream, extra) as server:
        pid = server.proc.pid
        with trio.fail_after(60):
            # Warm up the paths measured below (imports, pools, first allocations).
            warm = await chaos_request(server.port, "POST", "/echo", body=b"w" * 1000)
            assert warm.status == 200
            small = await upload_until_answered(server.port, chunked=chunked, total=2 * BODY_CAP)
            assert small.status == 413
            await trio.sleep(0.2)
            with peak_rss(pid) as rss:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sample_rss, pid, rss)
                    big = await upload_until_answered(server.port, chunked=chunked)
                    await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
            res = await chaos_request(server.port, "GET", "/after")  # still serving
            assert res.status == 200
    growth = rss["peak"] - rss["base"]
    print(f"\nrow 17 {'chunked' if chunked else 'content-length'}: 413 after "
          f"{big.seconds * 1000:.0f} ms, {big.sent / MIB:.1f} MiB sent, RSS {rss['base'] / MIB:.1f}"
          f" MiB -> peak {rss['peak'] / MIB:.1f} MiB (+{growth / MIB:.2f} MiB)")
    assert big.status == 413, big
    assert big.seconds < 5.0
    assert big.sent < 20 * MIB  # the rest was never read (only socket buffers filled)
    assert growth < BODY_CAP + 5 * MIB, growth
    assert [ex.request_target for ex in fake_upstream.exchanges] == ["/echo", "/after"]


async def test_row17_one_byte_per_second_body_is_408(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """1 byte/s against ``body_idle_timeout`` = 0.5 s: 408 after the first idle gap, both with
    a Content-Length and chunked; nothing reaches the upstream."""
    cfg = corpus_config(fake_upstream.url, journal_url, body_idle_timeout=0.5)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            for headers, body in (
                ([], b"x" * 20),
                ([("Transfer-Encoding", "chunked")], chunk(b"x" * 20) + END),
            ):
                start = trio.current_time()
                res = await chaos_request(ks.port, "POST", "/echo", headers=headers, body=body,
                                          body_interval=1.0, body_piece=1, timeout=10)
                took = trio.current_time() - start
                assert res.status == 408 and res.complete, (res.status, res.error)
                assert 0.5 <= took < 2.5, took
    assert fake_upstream.exchanges == []


async def test_row17_body_trickled_under_the_idle_timeout_is_still_408(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """4 bytes/s never leaves the body idle for ``body_idle_timeout`` (1 s): only a deadline for
    the whole body ends it (here ``body_timeout`` = 2 s), else a client holds a request open for
    ``max_body_bytes`` / rate (with the defaults, 1 byte every 29 s: months)."""
    cfg = corpus_config(fake_upstream.url, journal_url, body_idle_timeout=1.0, body_timeout=2.0)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            start = trio.current_time()
            res = await chaos_request(ks.port, "POST", "/echo", body=b"x" * 200,
                                      body_interval=0.25, body_piece=1, timeout=6)
            took = trio.current_time() - start
    assert res.status == 408 and took < 4.0, (res.status, took)
    assert fake_upstream.exchanges == []

