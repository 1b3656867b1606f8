"""Tests of the fake upstream (``keepstream.testing._upstream``) against real loopback peers.

Rules: every peer is on 127.0.0.1 with port 0, servers start with ``nursery.start``, and every
test that touches a socket is bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import h11
import httpx
import pytest
import trio

from keepstream.testing._client import chaos_request
from keepstream.testing._upstream import (
    FakeResponseSpec,
    FakeUpstream,
    UpstreamExchange,
    run_fake_upstream,
    sse_body,
)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    result: FakeUpstream = await nursery.start(run_fake_upstream)
    return result


async def _request_raw(
    port: int, request: bytes, *, limit: float = 5.0
) -> tuple[bytes, Exception | None]:
    """Send ``request`` on a fresh connection and read until EOF or an error."""
    received = bytearray()
    error: Exception | None = None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(limit):
            try:
                while data := await stream.receive_some(65536):
                    received += data
            except trio.BrokenResourceError as exc:
                error = exc
    return bytes(received), error


def _body_of(raw: bytes) -> tuple[int, bytes, bool]:
    """Parse a response with h11: (status, body, complete)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, body = 0, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return status, bytes(body), False
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body), True
        else:
            return status, bytes(body), False


def _get(headers: list[tuple[str, str]], target: str = "/v1/stream") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: upstream", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- the body generator, without sockets ----------------------------------------------------------


@pytest.mark.parametrize("style", ["llm", "plain", "chunked"])
@pytest.mark.parametrize("size", [60, 100, 1000])
def test_event_size_is_exact(style: str, size: int) -> None:
    spec = FakeResponseSpec.from_headers({"X-Fake-Style": style, "X-Fake-Event-Size": str(size)})
    parts = spec.expected_parts()
    events = parts[:5]
    assert [len(p) for p in events] == [size] * 5
    if style == "llm":
        assert parts[-1] == b"data: [DONE]\n\n"
        assert all(p.startswith(b'data: {"choices":[{"delta":{"content":"tok') for p in events)
    if style == "plain":
        assert events[2].startswith(b"id: 2\nevent: tick\ndata: tick 2 ")
    if style != "chunked":
        assert all(p.endswith(b"\n\n") and p.count(b"\n\n") == 1 for p in events)


def test_body_is_deterministic_and_seedable() -> None:
    assert sse_body(4, "plain", 80) == sse_body(4, "plain", 80)
    seeded = sse_body(4, "chunked", 300, seed=7)
    assert seeded == sse_body(4, "chunked", 300, seed=7)
    assert seeded != sse_body(4, "chunked", 300, seed=8)
    assert seeded != sse_body(4, "chunked", 300)
    spec = FakeResponseSpec(events=4, style="chunked", event_size=300, seed=7)
    assert FakeUpstream.expected_body(spec.headers()) == seeded


def test_malformed_body_mixes_line_ends_bom_and_invalid_utf8() -> None:
    body = sse_body(6, "plain", 100, malformed=True)
    assert body.startswith(b"\xef\xbb\xbf")
    assert b"\r\n\r\n" in body
    assert b"\r\r" in body
    assert b"\n\n" in body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")


def test_huge_line_ends_the_body_without_newline() -> None:
    body = sse_body(2, "llm", 100, huge_line=100_000)
    assert body.endswith(b"x" * 1000)
    line = body[body.rindex(b"\n") + 1 :]
    assert len(line) == 100_000
    assert line.startswith(b"data: x")
    assert b"[DONE]" not in body


def test_spec_headers_round_trip() -> None:
    spec = FakeResponseSpec(
        events=3,
        event_size=250,
        interval=0.25,
        style="plain",
        framing="length",
        stall_after=2,
        heartbeat=0.5,
        status=503,
        retry_after="7",
        malformed=True,
        seed=3,
        on_eof="continue",
    )
    assert FakeResponseSpec.from_headers(spec.headers()) == spec
    assert FakeResponseSpec.from_headers([]) == FakeResponseSpec()
    assert FakeResponseSpec().headers() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Fake-Style": "json"},
        {"X-Fake-Framing": "gzip"},
        {"X-Fake-Events": "-1"},
        {"X-Fake-Events": "many"},
        {"X-Fake-Status": "42"},
        {"X-Fake-Heartbeat": "0"},
    ],
)
def test_bad_header_values_are_rejected(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        FakeResponseSpec.from_headers(headers)


# -- over real sockets ----------------------------------------------------------------------------


async def test_default_answer_is_recorded(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, target="/v1/chat?x=1")
        await upstream.exchanges[0].done.wait()
        assert upstream.exchanges[0].finished_writing
        # kept alive: closed_at is set when the connection ends, after ``done``
        await upstream.wait_connections_closed()
    ex = upstream.exchanges[0]
    expected = FakeResponseSpec().expected_body()
    assert result.status == 200
    assert result.complete
    assert result.body == expected
    assert result.header("content-type") == b"text/event-stream"
    assert result.header("transfer-encoding") == b"chunked"
    assert ex.request_method == "GET"
    assert ex.request_target == "/v1/chat?x=1"
    assert (b"Host", f"127.0.0.1:{upstream.port}".encode()) in ex.request_headers
    assert bytes(ex.body_sent) == expected
    assert ex.finished_writing
    assert not ex.peer_closed_first
    assert ex.headers_sent_at is not None
    assert ex.last_byte_at is not None
    assert ex.closed_at is not None
    assert ex.started_at <= ex.headers_sent_at <= ex.last_byte_at <= ex.closed_at


SPECS = [
    FakeResponseSpec(),
    FakeResponseSpec(style="plain", framing="length", events=7, event_size=333),
    FakeResponseSpec(style="chunked", framing="close", events=3, event_size=5000, seed=11),
    FakeResponseSpec(style="llm", framing="length", events=0),
    FakeResponseSpec(malformed=True, events=4),
    FakeResponseSpec(malformed=True, style="plain", framing="close"),
    FakeResponseSpec(huge_line=300_000, events=2),
    FakeResponseSpec(huge_line=50_000, events=1, framing="length"),
    FakeResponseSpec(status=503, retry_after="3", events=2),
    FakeResponseSpec(status=500, framing="length", style="plain"),
    FakeResponseSpec(interval=0.01, events=4, framing="length"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.headers()))
async def test_every_setting_sends_exactly_the_expected_body(
    upstream: FakeUpstream, spec: FakeResponseSpec
) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers())
        await upstream.exchanges[0].done.wait()
    ex = upstream.exchanges[0]
    assert result.error is None
    assert result.complete
    assert result.status == spec.status
    assert result.body == spec.expected_body() == FakeUpstream.expected_body(spec.headers())
    assert bytes(ex.body_sent) == result.body
    if spec.retry_after is not None:
        assert result.header("retry-after") == spec.retry_after.encode()
    if spec.framing == "length":
        assert result.header("content-length") == str(len(result.body)).encode()
    if spec.framing == "close" or spec.huge_line is not None:
        assert result.header("connection") == b"close"
    if spec.framing == "close":
        assert result.closed_by_peer
    assert result.header("x-fake-exchange") == b"0"


async def test_chunked_framing_sends_one_chunk_per_event(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=3, event_size=120)
    with trio.fail_after(5):
        raw, error = await _request_raw(
            upstream.port, _get([*spec.headers(), ("Connection", "close")])
        )
    assert error is None
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in spec.expected_parts())
    assert raw.endswith(b"\r\n\r\n" + framed + b"0\r\n\r\n")


async def test_reset_after_k_bytes_gives_exactly_k_then_econnreset(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=5, event_size=100, reset_after=250)
    with trio.fail_after(5):
        raw, error = await _request_raw(upstream.port, _get(spec.headers()))
        await upstream.exchanges[0].done.wait()
    assert isinstance(error, trio.BrokenResourceError)
    assert isinstance(error.__cause__, ConnectionResetError)
    status, body, complete = _body_of(raw)
    assert status == 200
    assert not complete
    assert body == spec.expected_body()[:250]
    ex = upstream.exchanges[0]
    assert ex.reset_sent
    assert bytes(ex.body_sent) == body
    assert not ex.peer_closed_first


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
@pytest.mark.parametrize("k", [0, 1, 99, 100, 101, 499, 513])
async def test_reset_after_k_over_framings(upstream: FakeUpstream, framing: str, k: int) -> None:
    headers = [("X-Fake-Reset-After", str(k)), ("X-Fake-Framing", framing)]
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=headers)
    assert result.status == 200
    assert result.body == FakeUpstream.expected_body(headers)[:k]
    assert result.reset_by_peer
    assert not result.complete
    assert result.error is not None
    assert "ConnectionResetError" in result.error


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_cut_after_k_bytes_is_a_clean_close(upstream: FakeUpstream, framing: str) -> None:
    spec = FakeResponseSpec(cut_after=321, framing=framing)  # type: ignore[arg-type]
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers())
        await upstream.exchanges[0].done.wait()
    assert result.body == spec.expected_body()[:321]
    assert result.closed_by_peer
    assert not result.reset_by_peer
    assert not result.complete
    assert result.error is not None
    assert "RemoteProtocolError" in result.error
    assert not upstream.exchanges[0].reset_sent


async def test_stall_with_heartbeats(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=5, stall_after=2, heartbeat=0.05)
    events = spec.expected_parts()
    want = events[0] + events[1] + b": ping\n\n" * 3
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(
            upstream.port, headers=spec.headers(), disconnect_after_bytes=len(want)
        )
        elapsed = trio.current_time() - start
        await upstream.exchanges[0].done.wait()
    assert result.body == want
    assert 0.14 <= elapsed < 1.0
    ex = upstream.exchanges[0]
    assert ex.peer_closed_first
    assert not ex.finished_writing


async def test_stall_without_heartbeat_stays_silent_until_the_client_leaves(
    upstream: FakeUpstream,
) -> None:
    spec = FakeResponseSpec(events=5, stall_after=3)
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers(), timeout=0.3)
        left = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert result.error == "timeout"
    assert result.body == b"".join(spec.expected_parts()[:3])
    ex = upstream.exchanges[0]
    assert ex.closed_at is not None
    assert ex.closed_at - left < 0.1
    assert ex.peer_closed_first


async def test_stall_after_all_events_stalls_before_the_end_of_body(
    upstream: FakeUpstream,
) -> None:
    spec = FakeResponseSpec(events=2, style="plain", stall_after=2)
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers(), timeout=0.2)
    assert result.body == spec.expected_body()
    assert not result.complete


async def test_never_answer_holds_the_connection(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=[("X-Fake-Never-Answer", "1")], timeout=0.3
        )
        left = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert result.error == "timeout"
    assert result.status is None
    assert result.raw == b""
    ex = upstream.exchanges[0]
    assert ex.headers_sent_at is None
    assert ex.closed_at is not None
    assert ex.closed_at - left < 0.1
    assert ex.peer_closed_first
    assert upstream.open_connections() == 0


async def test_delay_headers(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=[("X-Fake-Delay-Headers", "0.2")])
    ex = upstream.exchanges[0]
    assert result.complete
    assert ex.headers_sent_at is not None
    assert ex.headers_sent_at - ex.started_at >= 0.2


async def test_client_leaving_during_delay_is_seen(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=[("X-Fake-Delay-Headers", "5")], timeout=0.1
        )
        left = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert result.error == "timeout"
    ex = upstream.exchanges[0]
    assert ex.closed_at is not None
    assert ex.closed_at - left < 0.1
    assert ex.headers_sent_at is None


async def test_echo_is_byte_exact(upstream: FakeUpstream) -> None:
    payload = bytes(range(256)) * 400 + b"\r\n\r\n\x00"
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port,
            "POST",
            "/echo",
            headers=[("Content-Type", "application/x-test; charset=latin-1")],
            body=payload,
        )
    assert result.complete
    assert result.body == payload
    assert result.header("content-type") == b"application/x-test; charset=latin-1"
    assert upstream.exchanges[0].request_body == payload
    assert upstream.exchanges[0].request_method == "POST"


async def test_echo_of_a_chunked_request_body(upstream: FakeUpstream) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n5\r\n\x00\xff\r\n\n\r\n0\r\n\r\n"
    )
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, raw_request=raw)
    assert result.body == b"abc\x00\xff\r\n\n"
    assert result.header("content-type") == b"application/json"


async def test_slow_close_is_recorded(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=2, slow_close=0.3)
    with trio.fail_after(5):
        raw, error = await _request_raw(upstream.port, _get(spec.headers()))
        eof_at = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert error is None
    assert _body_of(raw) == (200, spec.expected_body(), True)
    ex = upstream.exchanges[0]
    assert ex.last_byte_at is not None
    assert ex.closed_at is not None
    assert ex.closed_at - ex.last_byte_at >= 0.3
    assert eof_at - ex.last_byte_at >= 0.3
    assert not ex.peer_closed_first
    assert ex.finished_writing


@pytest.mark.parametrize("reset", [False, True])
async def test_closed_at_is_precise_while_paced(upstream: FakeUpstream, reset: bool) -> None:
    spec = FakeResponseSpec(events=10, interval=0.5)
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=spec.headers(), disconnect_after_events=1, reset=reset
        )
        left = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert result.body == spec.expected_parts()[0]
    ex = upstream.exchanges[0]
    assert ex.closed_at is not None
    assert 0 <= ex.closed_at - left < 0.1
    assert ex.peer_closed_first
    assert ex.peer_reset is reset
    assert (ex.peer_eof_at is None) is reset
    assert bytes(ex.body_sent) == spec.expected_parts()[0]
    assert upstream.open_connections() == 0


async def test_redirect(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=[("X-Fake-Redirect", "http://127.0.0.1:9/canary")]
        )
    assert result.status == 302
    assert result.header("location") == b"http://127.0.0.1:9/canary"
    assert result.body == b""
    assert result.complete


async def test_head_has_no_body(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, "HEAD", "/")
    assert result.status == 200
    assert result.complete
    assert result.body == b""


async def test_bad_fake_header_answers_400(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=[("X-Fake-Events", "lots")])
    assert result.status == 400
    assert b"invalid literal" in result.body
    assert len(upstream.exchanges) == 1


async def test_malformed_request_answers_400(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, raw_request=b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"
        )
    assert result.status == 400
    assert upstream.exchanges == []
    assert upstream.connections_seen == 1


async def test_keep_alive_and_pipelining(upstream: FakeUpstream) -> None:
    two = _get([("X-Fake-Events", "1")], "/a") + _get(
        [("X-Fake-Events", "2"), ("Connection", "close")], "/b"
    )
    with trio.fail_after(5):
        raw, error = await _request_raw(upstream.port, two)
        await upstream.wait_exchanges(2)
        await upstream.exchanges[1].done.wait()
    assert error is None
    assert [ex.request_target for ex in upstream.exchanges] == ["/a", "/b"]
    assert upstream.connections_seen == 1
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.endswith(b"0\r\n\r\n")
    assert upstream.open_connections() == 0


async def test_many_short_requests_are_fast(upstream: FakeUpstream) -> None:
    body = FakeUpstream.expected_body({"X-Fake-Events": "2"})
    bodies: list[bytes] = []

    async def worker(n: int) -> None:
        async with httpx.AsyncClient(base_url=upstream.url) as client:
            for _ in range(n):
                response = await client.get("/s", headers={"X-Fake-Events": "2"})
                bodies.append(response.content)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(worker, 100)
    assert len(upstream.exchanges) == 1000
    assert bodies == [body] * 1000
    assert upstream.connections_seen == 10


async def test_wait_exchanges_and_open_connections(upstream: FakeUpstream) -> None:
    seen: list[UpstreamExchange] = []

    async def waiter() -> None:
        await upstream.wait_exchanges(3)
        seen.extend(upstream.exchanges)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            for _ in range(3):
                await chaos_request(upstream.port)
        await upstream.wait_connections_closed()
    assert len(seen) == 3
    assert upstream.connections_seen == 3
    assert upstream.open_connections() == 0


async def test_stopping_the_upstream_closes_connections() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            up: FakeUpstream = await outer.start(run_fake_upstream)
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    lambda: chaos_request(up.port, headers=[("X-Fake-Never-Answer", "1")])
                )
                await up.wait_exchanges(1)
                outer.cancel_scope.cancel()
    ex = up.exchanges[0]
    assert ex.closed_at is not None
    assert not ex.peer_closed_first
    assert ex.done.is_set()
