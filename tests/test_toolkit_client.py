"""Tests of the chaos client (``keepstream.testing._client``) against the fake upstream.

The upstream is paced (``X-Fake-Interval``) wherever the test needs it to still be writing when
the client misbehaves, so the outcome does not depend on scheduling. Every test is bounded with
``trio.fail_after``.
"""

from __future__ import annotations

import pytest
import trio

from keepstream.testing._client import chaos_request
from keepstream.testing._upstream import FakeResponseSpec, FakeUpstream, run_fake_upstream

PACED = FakeResponseSpec(events=8, event_size=100, interval=0.05)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    result: FakeUpstream = await nursery.start(run_fake_upstream)
    return result


@pytest.mark.parametrize("k", [0, 1, 57, 100, 101, 250])
async def test_disconnect_after_bytes(upstream: FakeUpstream, k: int) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=PACED.headers(), disconnect_after_bytes=k
        )
        left = trio.current_time()
        await upstream.exchanges[0].done.wait()
    assert result.status == 200
    assert result.body == PACED.expected_body()[:k]
    assert not result.complete
    assert not result.closed_by_peer
    assert result.error is None
    ex = upstream.exchanges[0]
    assert ex.peer_closed_first
    assert ex.closed_at is not None
    assert ex.closed_at - left < 0.1
    assert bytes(ex.body_sent).startswith(result.body)


@pytest.mark.parametrize("n", [1, 3, 8])
async def test_disconnect_after_events(upstream: FakeUpstream, n: int) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=PACED.headers(), disconnect_after_events=n
        )
        await upstream.exchanges[0].done.wait()
    assert result.body == b"".join(PACED.expected_parts()[:n])
    assert result.events == n
    assert upstream.exchanges[0].peer_closed_first


async def test_disconnect_after_events_mid_chunk(upstream: FakeUpstream) -> None:
    """Events are counted in the de-chunked body, even when several share one read."""
    spec = FakeResponseSpec(events=6, style="plain")
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=spec.headers(), disconnect_after_events=4
        )
    assert result.body == b"".join(spec.expected_parts()[:4])


@pytest.mark.parametrize("reset", [False, True])
async def test_reset_sends_rst_instead_of_fin(upstream: FakeUpstream, reset: bool) -> None:
    with trio.fail_after(5):
        await chaos_request(
            upstream.port, headers=PACED.headers(), disconnect_after_events=2, reset=reset
        )
        await upstream.exchanges[0].done.wait()
    ex = upstream.exchanges[0]
    assert ex.peer_closed_first
    assert ex.peer_reset is reset
    assert (ex.peer_eof_at is not None) is not reset


async def test_half_close_with_an_upstream_that_keeps_writing(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=4, interval=0.02, on_eof="continue")
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers(), half_close=True)
        await upstream.exchanges[0].done.wait()
    assert result.complete
    assert result.body == spec.expected_body()
    ex = upstream.exchanges[0]
    assert ex.peer_eof_at is not None
    assert not ex.peer_closed_first
    assert ex.finished_writing


async def test_half_close_with_an_upstream_that_treats_eof_as_gone(
    upstream: FakeUpstream,
) -> None:
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=PACED.headers(), half_close=True)
        await upstream.exchanges[0].done.wait()
    assert not result.complete
    assert result.closed_by_peer
    assert len(result.body) < len(PACED.expected_body())
    ex = upstream.exchanges[0]
    assert ex.peer_eof_at is not None
    assert ex.peer_closed_first


async def test_stall_keeps_the_socket_open_and_blocks_the_writer(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=200, style="chunked", event_size=10_000)
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(
            upstream.port,
            headers=spec.headers(),
            stall_after_bytes=1000,
            hold=0.4,
            recv_buffer=4096,
        )
        elapsed = trio.current_time() - start
        await upstream.exchanges[0].done.wait()
    assert result.body == spec.expected_body()[:1000]
    assert result.error is None
    assert not result.closed_by_peer
    assert elapsed >= 0.4
    ex = upstream.exchanges[0]
    assert ex.peer_closed_first  # the upstream was still blocked writing when the client left
    assert len(ex.body_sent) < len(spec.expected_body())


async def test_stall_ends_when_the_peer_closes(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=3, framing="close")
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(
            upstream.port, headers=spec.headers(), stall_after_bytes=50, hold=5
        )
    assert trio.current_time() - start < 1
    assert result.closed_by_peer
    assert not result.reset_by_peer
    assert result.body == spec.expected_body()[:50]


async def test_stall_sees_a_reset(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=5, reset_after=300)
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=spec.headers(), stall_after_bytes=10, hold=5
        )
    assert result.closed_by_peer
    assert result.reset_by_peer


async def test_small_reads_with_delay_still_parse_exactly(upstream: FakeUpstream) -> None:
    spec = FakeResponseSpec(events=3, event_size=40)
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=spec.headers(), read_size=7, read_delay=0.001
        )
    assert result.complete
    assert result.body == spec.expected_body()
    assert result.raw.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("framing", ["length", "close"])
async def test_other_framings_complete(upstream: FakeUpstream, framing: str) -> None:
    spec = FakeResponseSpec(events=3, framing=framing)  # type: ignore[arg-type]
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, headers=spec.headers())
    assert result.complete
    assert result.body == spec.expected_body()


async def test_raw_request_is_sent_verbatim(upstream: FakeUpstream) -> None:
    raw = (
        b"POST /echo?q=1 HTTP/1.1\r\nHost: a\r\nX-Dup: 1\r\nX-Dup: 2\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, raw_request=raw)
    assert result.body == b"abc"
    ex = upstream.exchanges[0]
    assert ex.request_target == "/echo?q=1"
    assert ex.request_headers == [
        (b"Host", b"a"),
        (b"X-Dup", b"1"),
        (b"X-Dup", b"2"),
        (b"Content-Length", b"3"),
    ]


async def test_slow_body_upload(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(
            upstream.port, "POST", "/echo", body=b"0123456789", body_interval=0.02, body_piece=2
        )
    assert result.body == b"0123456789"
    assert trio.current_time() - start >= 0.08


async def test_timeout_is_reported(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        result = await chaos_request(
            upstream.port, headers=[("X-Fake-Never-Answer", "1")], timeout=0.1
        )
    assert result.error == "timeout"
    assert result.status is None


async def test_refused_connection_is_reported() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with trio.fail_after(5):
        result = await chaos_request(port)
    assert result.error is not None
    assert result.error.startswith("connect: ConnectionRefusedError")


ECHO_ONE = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\none"
ECHO_TWO_THEN_CLOSE = (b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                       b"Content-Length: 3\r\n\r\ntwo")


async def test_after_holds_the_answer_to_a_pipelined_request(upstream: FakeUpstream) -> None:
    """``read_after``: the first answer is parsed; the second (to the request pipelined behind)
    is in ``after``, byte for byte, and the server's close after it is seen."""
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, raw_request=ECHO_ONE + ECHO_TWO_THEN_CLOSE,
                                     read_after=2.0)
    assert result.status == 200 and result.complete and result.body == b"one"
    assert result.after.startswith(b"HTTP/1.1 200 ") and result.after.endswith(b"\r\n\r\ntwo")
    assert result.after.count(b"HTTP/1.1 ") == 1
    assert result.raw.endswith(result.after) and len(result.raw) > len(result.after)
    assert result.closed_by_peer and not result.reset_by_peer
    assert result.error is None
    assert [ex.request_body for ex in upstream.exchanges] == [b"one", b"two"]


async def test_read_after_ends_after_its_seconds_on_an_open_connection(
    upstream: FakeUpstream,
) -> None:
    """Keep-alive: nothing follows the answer and the connection stays open; ``read_after``
    gives up after its seconds, with no error and no close seen."""
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(upstream.port, raw_request=ECHO_ONE, read_after=0.3)
        took = trio.current_time() - start
    assert result.status == 200 and result.complete and result.body == b"one"
    assert result.after == b""
    assert not result.closed_by_peer and result.error is None
    assert 0.3 <= took < 2.0


async def test_without_read_after_nothing_more_is_read(upstream: FakeUpstream) -> None:
    """The default: the call returns at the end of the answer, on a connection kept alive."""
    with trio.fail_after(5):
        start = trio.current_time()
        result = await chaos_request(upstream.port, raw_request=ECHO_ONE)
        took = trio.current_time() - start
    assert result.body == b"one" and result.complete and result.after == b""
    assert not result.closed_by_peer and took < 1.0


async def test_read_after_sees_a_reset(upstream: FakeUpstream) -> None:
    """An RST after the answer (here: the fake upstream resets mid-body of the second one)."""
    second = FakeResponseSpec(events=3, reset_after=10, interval=0.05)
    raw = ECHO_ONE + b"GET /x HTTP/1.1\r\nHost: a\r\n" + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in second.headers()) + b"\r\n"
    with trio.fail_after(5):
        result = await chaos_request(upstream.port, raw_request=raw, read_after=3.0)
    assert result.body == b"one" and result.complete
    assert result.after.startswith(b"HTTP/1.1 200 ")
    assert result.closed_by_peer and result.reset_by_peer


@pytest.mark.parametrize("stop", [{"disconnect_after_bytes": 1}, {"disconnect_after_events": 1},
                                  {"stall_after_bytes": 1}])
async def test_read_after_with_a_stop_option_is_refused(
    upstream: FakeUpstream, stop: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match="read_after"):
        await chaos_request(upstream.port, read_after=1.0, **stop)  # type: ignore[arg-type]
    assert upstream.connections_seen == 0
