"""I9 end to end: what never reaches the upstream, and what always does byte for byte."""

from __future__ import annotations

import json
from functools import partial

import trio

from keepstream.testing import Canary, FakeUpstream, chaos_request, run_keepstream

from .conftest import make_config


async def test_absolute_and_authority_form_never_reach_upstream(
    fake_upstream: FakeUpstream, journal_url: str, canary: Canary
) -> None:
    c = canary.listen  # 127.0.0.1:PORT
    cfg = make_config(fake_upstream.url, journal_url)
    vectors = [
        f"GET http://{c}/x HTTP/1.1\r\nHost: {c}\r\n\r\n",
        f"GET http://{c} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"CONNECT {c} HTTP/1.1\r\nHost: {c}\r\n\r\n",
        "GET //127.0.0.1/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a/../../x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a/%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a%2f..%2fx HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            for raw in vectors:
                res = await chaos_request(ks.port, raw_request=raw.encode())
                assert res.status is not None and 400 <= res.status < 500, (raw, res.status)
            assert ks.proxy.supervisor.started_total == 0
    assert fake_upstream.exchanges == []
    assert canary.connections == 0


async def test_connection_named_and_hop_by_hop_headers_not_forwarded(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(
                ks.port, "GET", "/h",
                headers=[("Connection", "close, X-Secret"), ("X-Secret", "s3cret"),
                         ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                         ("Proxy-Authorization", "Basic eA=="), ("X-Kept", "yes"),
                         ("X-Fake-Events", "2")],
            )
            assert res.status == 200 and res.complete
    (ex,) = fake_upstream.exchanges
    names = {k.lower() for k, _ in ex.request_headers}
    for banned in (b"x-secret", b"connection", b"keep-alive", b"te", b"proxy-authorization"):
        assert banned not in names, banned
    assert ex.header("x-kept") == "yes"
    # httpx adds none of its own defaults either.
    assert ex.header("user-agent") is None and ex.header("accept-encoding") is None


async def test_post_json_byte_for_byte(fake_upstream: FakeUpstream, journal_url: str) -> None:
    payload = json.dumps({"model": "x", "messages": [{"role": "user", "content": "h\u00e9llo"}],
                          "n": [1, 2.5, None]}, ensure_ascii=False).encode()
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "POST", "/echo", body=payload,
                                      headers=[("Content-Type", "application/json")])
            assert res.status == 200 and res.body == payload
            sid = res.header("keepstream-id")
            assert sid is not None
            rec = await ks.wait_terminal(sid.decode())
            assert rec["status"] == "completed" and rec["method"] == "POST"
            assert await ks.body(sid.decode()) == payload
    assert fake_upstream.exchanges[0].request_body == payload


async def test_request_body_over_cap_is_413(fake_upstream: FakeUpstream, journal_url: str) -> None:
    from keepstream import ServerConfig

    cfg = make_config(fake_upstream.url, journal_url,
                      server=ServerConfig(bind="127.0.0.1:0", max_body_bytes=1000))
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "POST", "/echo", body=b"x" * 5000)
            assert res.status == 413
    assert fake_upstream.exchanges == []


async def test_unknown_stream_and_endpoints(fake_upstream: FakeUpstream, journal_url: str) -> None:
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            assert (await chaos_request(ks.port, "GET", "/_keepstream/healthz")).status == 200
            assert (await chaos_request(ks.port, "GET", "/_keepstream/readyz")).status == 200
            res = await chaos_request(ks.port, "GET", "/_keepstream/streams/abc123")
            assert res.status == 404 and b"no such stream" in res.body
            res = await chaos_request(ks.port, "GET", "/_keepstream/nope")
            assert res.status == 404
            res = await chaos_request(ks.port, "GET", "/_keepstream/metrics")
            assert res.status == 200 and b"keepstream_streams_started_total 0" in res.body
    assert fake_upstream.exchanges == []


async def test_upstream_cookies_are_never_kept_between_callers(journal_url: str) -> None:
    """The upstream client is shared by every caller: a ``Set-Cookie`` the upstream sends to one
    caller must reach that caller only, never come back upstream on another caller's request
    (httpx's client keeps a cookie jar by default)."""
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            seen.append(head)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=alice; Path=/\r\n"
                                  b"Content-Length: 2\r\n\r\nok")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        cfg = make_config(f"http://127.0.0.1:{port}", journal_url)
        with trio.fail_after(20):
            async with run_keepstream(cfg) as ks:
                first = await chaos_request(ks.port, "GET", "/alice")
                assert first.status == 200 and first.header("set-cookie") == \
                    b"session=alice; Path=/"
                second = await chaos_request(ks.port, "GET", "/bob")
                assert second.status == 200
        nursery.cancel_scope.cancel()
    assert len(seen) == 2
    assert b"cookie:" not in seen[1].lower(), seen[1]
