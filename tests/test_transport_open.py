"""``FastTransport.open``: a stream's request written without httpx's ``Request`` and
``Response`` objects must put on the wire exactly what ``client.build_request`` and
``handle_async_request`` put there for the same arguments (hypothesis, then a raw loopback
upstream), and a client that would add something to a request (an embedder's default header)
still goes the ``build_request`` way.

Rules: every server is on 127.0.0.1, port 0; every socket test is bounded with
``trio.fail_after``.
"""

from __future__ import annotations

from functools import cache

import httpx
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from keepstream import Config, Route, open_proxy
from keepstream._config import JournalConfig
from keepstream._proxy import make_client
from keepstream._state import Ending, Status
from keepstream._transport import FastTransport, request_head

from .test_transport import RawServer, read_request, start

_CONFIG = Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:9/"),))
_NAMES = [b"host", b"Host", b"HOST", b"content-length", b"Content-Length", b"accept",
          b"x-a", b"X-Trace", b"authorization", b"cookie", b"transfer-encoding"]
_VALUE = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if 0x20 <= c < 0x7F).strip()
)


@cache
def _client() -> httpx.AsyncClient:
    return make_client(_CONFIG)  # (never opened: build_request only)


def _httpx_head(request: httpx.Request) -> bytes:
    """What ``FastTransport.handle_async_request`` writes for ``request`` before its body."""
    head = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        head += [name, b": ", value, b"\r\n"]
    return b"".join([*head, b"\r\n"])


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "put", "DELETE"]),
    port=st.sampled_from(["", ":80", ":8080"]),
    path=st.sampled_from(["/", "/v1/chat", "/a%20b/c", "/x;y"]),
    query=st.sampled_from(["", "?q=1", "?a=1&b=%2F", "?"]),
    headers=st.lists(st.tuples(st.sampled_from(_NAMES), _VALUE), max_size=6),
    body=st.binary(max_size=30),
)
def test_open_writes_the_head_build_request_gives(
    method: str, port: str, path: str, query: str, headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    client = _client()
    url = httpx.URL(f"http://upstream.test{port}{path}{query}")
    request = client.build_request(method, url, headers=headers, content=body)
    assert request_head(method.upper().encode("ascii"), url, headers, body) == \
        _httpx_head(request)


#: An SSE answer's framing and body for ``_recording``: chunked, b"abc".
_ABC = b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
_HEADERS = [(b"accept", b"text/event-stream"), (b"x-a", b"1")]


async def _recording(nursery: trio.Nursery, rest: bytes) -> tuple[RawServer, list[bytes]]:
    """An upstream that records each request and answers an SSE response (its framing and
    body: ``rest``)."""
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while req := await read_request(stream):
            seen.append(req)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + rest)

    return await start(nursery, handler), seen


async def test_open_and_handle_async_request_send_the_same_bytes(
    nursery: trio.Nursery,
) -> None:
    server, seen = await _recording(nursery, _ABC)
    transport = FastTransport()
    url = httpx.URL(f"http://127.0.0.1:{server.port}/v1/s?x=1")
    headers, timeouts = _HEADERS, httpx.Timeout(5.0).as_dict()
    with trio.fail_after(5):
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):  # the second on the kept-alive connection
                status, raw, body = await transport.open("post", url, headers, b"{}", timeouts)
                assert status == 200
                assert (b"Content-Type", b"text/event-stream") in raw
                assert b"".join([piece async for piece in body]) == b"abc"
                await body.aclose()
            for _ in range(2):
                for name in list(client.headers.keys()):
                    del client.headers[name]
                r = await client.post(url, headers=headers, content=b"{}")
                assert r.content == b"abc"
    assert server.accepted == 1  # open() returns its connections to the same pool
    assert len(seen) == 4 and seen[0] == seen[1] == seen[2] == seen[3]
    assert seen[0].startswith(b"POST /v1/s?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_a_client_with_a_default_header_goes_the_build_request_way(
    nursery: trio.Nursery,
) -> None:
    """The shortcut is only for a client that adds nothing: an embedder's default header on
    keepstream's own client still reaches the upstream."""
    server, seen = await _recording(nursery, b"Content-Length: 9\r\n\r\ndata: 1\n\n")
    cfg = Config(routes=(Route(prefix="/", upstream=f"http://127.0.0.1:{server.port}/"),),
                 journal=JournalConfig(url="memory:"))
    with trio.fail_after(10):
        async with open_proxy(cfg) as proxy:
            for default in (None, "on"):
                if default is not None:
                    proxy.supervisor.client.headers["x-default"] = default
                async with proxy.open_stream("GET", "/s", headers=[("x-a", "1")]) as h:
                    assert h.status_code == 200
                    assert b"".join([piece async for piece in h]) == \
                        b"data: 1\n\n"
    assert len(seen) == 2
    assert b"x-default" not in seen[0].lower() and b"x-a: 1\r\n" in seen[0]
    assert b"x-default: on\r\n" in seen[1] and b"x-a: 1\r\n" in seen[1]


# -- send_now: the request written before its reader waits -------------------------------------


async def test_send_now_writes_what_open_would_and_open_reads_its_answer(
    nursery: trio.Nursery,
) -> None:
    """On an idle pooled connection ``send_now`` writes, at once and without a checkpoint,
    the bytes ``open`` writes for the same arguments; ``open`` then reads that request's
    answer on that connection. With no idle connection it writes nothing (None)."""
    server, seen = await _recording(nursery, _ABC)
    transport = FastTransport()
    url = httpx.URL(f"http://127.0.0.1:{server.port}/v1/s?x=1")
    headers, timeouts = _HEADERS, httpx.Timeout(5.0).as_dict()
    with trio.fail_after(5):
        assert transport.send_now("post", url, headers, b"{}") is None  # nothing pooled
        status, _, body = await transport.open("post", url, headers, b"{}", timeouts)
        assert b"".join([piece async for piece in body]) == b"abc"
        await body.aclose()  # the connection is idle in the pool now
        sent = transport.send_now("post", url, headers, b"{}")
        assert sent is not None and sent.rest == b""  # the socket took all of it
        status, raw, body = await transport.open("ignored", url, [], b"", timeouts, sent)
        assert status == 200 and (b"Content-Type", b"text/event-stream") in raw
        assert b"".join([piece async for piece in body]) == b"abc"
        await body.aclose()
        await transport.aclose()
    assert server.accepted == 1
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[1].startswith(b"POST /v1/s?x=1 HTTP/1.1\r\n") and seen[1].endswith(b"{}")


async def test_a_request_sent_early_and_discarded_closes_its_connection(
    nursery: trio.Nursery,
) -> None:
    closed = trio.Event()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        closed.set()  # read_request gave b"": the proxy side closed the connection

    server = await start(nursery, handler)
    transport = FastTransport()
    url = httpx.URL(f"http://127.0.0.1:{server.port}/")
    timeouts = httpx.Timeout(5.0).as_dict()
    with trio.fail_after(5):
        _, _, body = await transport.open("GET", url, [], b"", timeouts)
        assert b"".join([piece async for piece in body]) == b"ok"
        await body.aclose()
        sent = transport.send_now("GET", url, [], b"")
        assert sent is not None
        transport.discard(sent)
        await closed.wait()
    assert transport._n_conns == 0 and transport._n_idle == 0


async def test_a_stream_asks_its_upstream_before_its_task_runs(nursery: trio.Nursery) -> None:
    """Through the proxy: once a kept-alive upstream connection is idle, a new stream's
    request is on it when ``start_stream`` returns (before the stream task's first step),
    and the stream reads its answer; a stream stopped before its task ran closes that
    connection and still ends with a terminal record."""
    got = trio.Event()
    requests: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while req := await read_request(stream):
            requests.append(req)
            got.set()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                  b"Content-Length: 9\r\n\r\ndata: 1\n\n")

    server = await start(nursery, handler)
    cfg = Config(routes=(Route(prefix="/", upstream=f"http://127.0.0.1:{server.port}/"),),
                 journal=JournalConfig(url="memory:"))
    with trio.fail_after(10):
        async with open_proxy(cfg) as proxy:
            async with proxy.open_stream("GET", "/s") as h:  # leaves the connection idle
                assert b"".join([piece async for piece in h]) == b"data: 1\n\n"
            sup = proxy.supervisor
            route = cfg.routes[0]
            url = sup.upstream_url(route, "/s", b"")
            for stop_first in (False, True):
                got = trio.Event()
                stream = await sup.start_stream(route, "GET", "/s", url, [], b"")
                # No checkpoint since start_stream returned: the stream task has not run.
                assert stream._sent is not None
                if stop_first:
                    stream.stop(Ending.CLIENT_GONE_CANCEL, "stopped before its task ran")
                await got.wait()  # the upstream has the request
                await stream.done.wait()
                assert stream.record.status is (
                    Status.CANCELLED if stop_first else Status.COMPLETED)
            assert len(requests) == 3 and requests[1] == requests[2] == requests[0]
            assert server.accepted == 1  # one connection, used by all three
            transport = sup.transport
            # ... and closed with the stopped stream, not put back in the pool.
            assert transport is not None and transport._n_conns == transport._n_idle == 0
