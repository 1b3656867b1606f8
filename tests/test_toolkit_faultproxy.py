"""Tests of the fault proxy (``keepstream.testing._faultproxy``): every toxic against real peers.

A "peer" server hands each accepted connection to the test, so the test holds both ends of a
proxied connection: ``client`` (connected to the proxy) and ``server`` (the target's side).
"downstream" toxics act on server -> client bytes, "upstream" ones on client -> server bytes.
Every test is bounded with ``trio.fail_after``; timing bounds are generous on the slow side.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from keepstream.testing import (
    FakeResponseSpec,
    FakeUpstream,
    FaultProxy,
    chaos_request,
    run_fake_upstream,
    run_fault_proxy,
)


@dataclass
class Peer:
    port: int
    accepted: trio.MemoryReceiveChannel[trio.SocketStream]


async def run_peer(*, task_status: trio.TaskStatus[Peer] = trio.TASK_STATUS_IGNORED) -> None:
    send, receive = trio.open_memory_channel[trio.SocketStream](64)

    async def handler(stream: trio.SocketStream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # the test owns and closes the stream

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(Peer(listeners[0].socket.getsockname()[1], receive))


@pytest.fixture
async def peer(nursery: trio.Nursery) -> Peer:
    result: Peer = await nursery.start(run_peer)
    return result


@pytest.fixture
async def proxy(nursery: trio.Nursery, peer: Peer) -> FaultProxy:
    result: FaultProxy = await nursery.start(
        partial(run_fault_proxy, seed=1), "127.0.0.1", peer.port
    )
    return result


@dataclass
class Pair:
    client: trio.SocketStream
    server: trio.SocketStream


@pytest.fixture
async def pair(proxy: FaultProxy, peer: Peer) -> AsyncIterator[Pair]:
    with trio.fail_after(5):
        client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        server = await peer.accepted.receive()
    yield Pair(client, server)
    client.socket.close()
    server.socket.close()


async def read_exact(stream: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


async def read_to_end(stream: trio.SocketStream) -> tuple[bytes, BaseException | None]:
    """Read until EOF (error None) or an error (returned)."""
    out = bytearray()
    try:
        while data := await stream.receive_some(65536):
            out += data
    except trio.BrokenResourceError as exc:
        return bytes(out), exc
    return bytes(out), None


def is_reset(exc: BaseException | None) -> bool:
    return isinstance(exc, trio.BrokenResourceError) and isinstance(
        exc.__cause__, ConnectionResetError
    )


async def test_pass_through_is_byte_exact_with_half_close(pair: Pair) -> None:
    up = os.urandom(300_000)
    down = os.urandom(500_000)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.send_all, up)
            assert await read_exact(pair.server, len(up)) == up
        await pair.client.send_eof()
        assert await pair.server.receive_some(10) == b""  # the half-close went through
        await pair.server.send_all(down)  # the other direction still works
        await pair.server.send_eof()
        assert await read_to_end(pair.client) == (down, None)


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
async def test_slicer_makes_every_read_one_byte(
    proxy: FaultProxy, pair: Pair, direction: str
) -> None:
    proxy.add_toxic("slicer", stream=direction,  # type: ignore[arg-type]
                    average_size=1, size_variation=0, delay=20_000)
    sender, receiver = (
        (pair.server, pair.client) if direction == "downstream" else (pair.client, pair.server)
    )
    data = b"data: hello world\n\n" if direction == "downstream" else b"POST / HTTP/1.1\r\n"
    reads: list[bytes] = []
    with trio.fail_after(5):
        await sender.send_all(data)
        while len(b"".join(reads)) < len(data):
            reads.append(await receiver.receive_some(65536))
    assert reads == [bytes([b]) for b in data]


async def test_slicer_sizes_stay_within_the_variation(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("slicer", average_size=5, size_variation=2, delay=15_000)
    data = bytes(range(60))
    reads: list[bytes] = []
    with trio.fail_after(5):
        await pair.server.send_all(data)
        while len(b"".join(reads)) < len(data):
            reads.append(await pair.client.receive_some(65536))
    assert b"".join(reads) == data
    assert all(3 <= len(r) <= 7 for r in reads[:-1])
    assert len({len(r) for r in reads}) > 1


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
async def test_limit_data_closes_after_exactly_n_bytes(
    proxy: FaultProxy, pair: Pair, direction: str
) -> None:
    proxy.add_toxic("limit_data", stream=direction, bytes=1000)  # type: ignore[arg-type]
    sender, receiver = (
        (pair.server, pair.client) if direction == "downstream" else (pair.client, pair.server)
    )
    data = os.urandom(3000)
    with trio.fail_after(5):
        await sender.send_all(data[:400])
        assert await read_exact(receiver, 400) == data[:400]
        try:
            await sender.send_all(data[400:])
        except trio.BrokenResourceError:
            pass
        received, _ = await read_to_end(receiver)
    assert received == data[400:1000]
    assert proxy.open_connections() == 0


async def test_reset_peer_resets_both_sides(proxy: FaultProxy, pair: Pair) -> None:
    with trio.fail_after(5):
        await pair.server.send_all(b"before")
        assert await read_exact(pair.client, 6) == b"before"
        proxy.add_toxic("reset_peer", timeout=100)
        start = trio.current_time()
        await pair.server.send_all(b"dropped")
        received, error = await read_to_end(pair.client)
        elapsed = trio.current_time() - start
        server_data, server_error = await read_to_end(pair.server)
    assert received == b""
    assert is_reset(error)
    assert 0.1 <= elapsed < 0.6
    assert server_data == b""
    assert is_reset(server_error)


async def test_reset_peer_timeout_zero_is_immediate(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("reset_peer", stream="upstream", timeout=0)
    with trio.fail_after(5):
        start = trio.current_time()
        await pair.client.send_all(b"x")
        _, error = await read_to_end(pair.client)
    assert is_reset(error)
    assert trio.current_time() - start < 0.1


async def test_latency_adds_at_least_latency(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("latency", latency=150)
    with trio.fail_after(5):
        start = trio.current_time()
        for i in range(5):
            await pair.server.send_all(b"chunk%d;" % i)
            await trio.sleep(0.01)
        first = await pair.client.receive_some(65536)
        first_at = trio.current_time() - start
        rest = await read_exact(pair.client, 35 - len(first))
        last_at = trio.current_time() - start
    assert first + rest == b"".join(b"chunk%d;" % i for i in range(5))
    assert 0.15 <= first_at < 0.4
    # chunks are delayed from when they were read, not one after another
    assert last_at < 0.15 + 0.05 + 0.25


async def test_latency_jitter_stays_in_range(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("latency", latency=60, jitter=40)
    delays: list[float] = []
    with trio.fail_after(5):
        for _ in range(8):
            start = trio.current_time()
            await pair.server.send_all(b"x")
            assert await pair.client.receive_some(10) == b"x"
            delays.append(trio.current_time() - start)
    assert all(0.02 <= d < 0.25 for d in delays)
    assert max(delays) - min(delays) > 0.005


async def test_upstream_latency_leaves_downstream_alone(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("latency", stream="upstream", latency=200)
    with trio.fail_after(5):
        start = trio.current_time()
        await pair.server.send_all(b"down")
        assert await read_exact(pair.client, 4) == b"down"
        assert trio.current_time() - start < 0.1
        start = trio.current_time()
        await pair.client.send_all(b"up")
        assert await read_exact(pair.server, 2) == b"up"
        assert trio.current_time() - start >= 0.2


async def test_bandwidth_limits_the_rate(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("bandwidth", rate=100)  # 100 KB/s
    data = os.urandom(40_000)  # 0.4 s at that rate
    with trio.fail_after(5):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.server.send_all, data)
            received = await read_exact(pair.client, len(data))
        elapsed = trio.current_time() - start
    assert received == data
    assert 0.35 <= elapsed < 1.0


async def test_timeout_zero_holds_the_connection_until_removed(
    proxy: FaultProxy, pair: Pair
) -> None:
    name = proxy.add_toxic("timeout", timeout=0)
    with trio.fail_after(5):
        await pair.server.send_all(b"swallowed")
        with trio.move_on_after(0.3) as waited:
            await pair.client.receive_some(65536)
        assert waited.cancelled_caught  # no data, no EOF: the connection is held
        proxy.remove_toxic(name)
        await pair.server.send_all(b"flows again")
        assert await read_exact(pair.client, 11) == b"flows again"
        await pair.client.send_all(b"and back")
        assert await read_exact(pair.server, 8) == b"and back"


async def test_upstream_bandwidth_limits_the_rate_to_the_target(
    proxy: FaultProxy, pair: Pair
) -> None:
    proxy.add_toxic("bandwidth", stream="upstream", rate=100)  # 100 KB/s
    data = os.urandom(40_000)  # 0.4 s at that rate
    with trio.fail_after(5):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.send_all, data)
            received = await read_exact(pair.server, len(data))
        elapsed = trio.current_time() - start
        start = trio.current_time()
        await pair.server.send_all(b"down is not limited")
        assert await read_exact(pair.client, 19) == b"down is not limited"
        assert trio.current_time() - start < 0.1
    assert received == data
    assert 0.35 <= elapsed < 1.0


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
async def test_timeout_drops_the_bytes_then_closes(
    proxy: FaultProxy, pair: Pair, direction: str
) -> None:
    sender, receiver = (
        (pair.server, pair.client) if direction == "downstream" else (pair.client, pair.server)
    )
    with trio.fail_after(5):
        start = trio.current_time()
        proxy.add_toxic("timeout", stream=direction, timeout=200)  # type: ignore[arg-type]
        await sender.send_all(b"dropped")
        received, _ = await read_to_end(receiver)
        elapsed = trio.current_time() - start
    assert received == b""
    assert 0.2 <= elapsed < 0.6
    assert proxy.open_connections() == 0


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
async def test_slow_close_delays_the_close(proxy: FaultProxy, pair: Pair, direction: str) -> None:
    """The bytes pass at once; the sender's close (downstream: the server closes its socket;
    upstream: the client half-closes) reaches the other side ``delay`` ms later."""
    proxy.add_toxic("slow_close", stream=direction, delay=300)  # type: ignore[arg-type]
    sender, receiver = (
        (pair.server, pair.client) if direction == "downstream" else (pair.client, pair.server)
    )
    with trio.fail_after(5):
        await sender.send_all(b"last words")
        start = trio.current_time()
        if direction == "downstream":
            pair.server.socket.close()
        else:
            await pair.client.send_eof()
        assert await read_exact(receiver, 10) == b"last words"
        assert trio.current_time() - start < 0.1  # the data is not delayed
        assert await receiver.receive_some(10) == b""
        elapsed = trio.current_time() - start
    assert 0.3 <= elapsed < 0.7


async def test_close_without_toxic_is_prompt(pair: Pair) -> None:
    with trio.fail_after(5):
        start = trio.current_time()
        pair.server.socket.close()
        assert await pair.client.receive_some(10) == b""
    assert trio.current_time() - start < 0.1


async def test_removing_a_toxic_restores_pass_through(proxy: FaultProxy, pair: Pair) -> None:
    name = proxy.add_toxic("latency", latency=250)
    with trio.fail_after(5):
        start = trio.current_time()
        await pair.server.send_all(b"slow")
        assert await read_exact(pair.client, 4) == b"slow"
        assert trio.current_time() - start >= 0.25
        proxy.remove_toxic(name)
        assert proxy.toxics == {}
        start = trio.current_time()
        await pair.server.send_all(b"fast")
        assert await read_exact(pair.client, 4) == b"fast"
        assert trio.current_time() - start < 0.1


async def test_zero_toxicity_never_applies(proxy: FaultProxy, pair: Pair) -> None:
    proxy.add_toxic("timeout", toxicity=0.0, timeout=0)
    with trio.fail_after(5):
        await pair.server.send_all(b"through")
        assert await read_exact(pair.client, 7) == b"through"


async def test_client_reset_is_passed_on_as_reset(pair: Pair) -> None:
    with trio.fail_after(5):
        pair.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.client.socket.close()
        _, error = await read_to_end(pair.server)
    assert is_reset(error)


async def test_refused_target_closes_the_client(nursery: trio.Nursery) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    refused: FaultProxy = await nursery.start(run_fault_proxy, "127.0.0.1", port)
    with trio.fail_after(5):
        client = await trio.open_tcp_stream("127.0.0.1", refused.port)
        async with client:
            assert await read_to_end(client) == (b"", None)
    assert refused.connections_seen == 1


def test_add_toxic_validates_like_toxiproxy() -> None:
    proxy = FaultProxy(port=1, target_host="127.0.0.1", target_port=2)
    assert proxy.listen == "127.0.0.1:1"
    assert proxy.add_toxic("latency", latency=10) == "latency_downstream"
    assert proxy.add_toxic("latency", stream="upstream") == "latency_upstream"
    assert proxy.toxics["latency_downstream"].attributes == {"latency": 10, "jitter": 0}
    with pytest.raises(ValueError):
        proxy.add_toxic("latency", latency=5)  # the name is taken
    with pytest.raises(ValueError):
        proxy.add_toxic("packet_loss")
    with pytest.raises(ValueError):
        proxy.add_toxic("slicer", name="s", avg=3)
    with pytest.raises(ValueError):
        proxy.add_toxic("bandwidth", rate=-1)
    with pytest.raises(ValueError):
        proxy.add_toxic("bandwidth", name="b", toxicity=2.0)
    proxy.update_toxic("latency_downstream", jitter=4)
    assert proxy.toxics["latency_downstream"].attributes == {"latency": 10, "jitter": 4}
    proxy.remove_toxic("latency_upstream")
    with pytest.raises(KeyError):
        proxy.remove_toxic("latency_upstream")
    proxy.remove_all_toxics()
    assert proxy.toxics == {}


async def test_http_through_slicer_and_latency_is_byte_exact(nursery: trio.Nursery) -> None:
    upstream: FakeUpstream = await nursery.start(run_fake_upstream)
    proxy: FaultProxy = await nursery.start(
        partial(run_fault_proxy, seed=5), "127.0.0.1", upstream.port
    )
    proxy.add_toxic("slicer", average_size=7, size_variation=5, delay=50)
    proxy.add_toxic("latency", latency=20, jitter=10)
    spec = FakeResponseSpec(events=20, style="plain", malformed=True)
    with trio.fail_after(10):
        result = await chaos_request(proxy.port, headers=spec.headers())
    assert result.complete
    assert result.body == spec.expected_body()


async def test_http_limit_data_cuts_the_body(nursery: trio.Nursery) -> None:
    upstream: FakeUpstream = await nursery.start(run_fake_upstream)
    proxy: FaultProxy = await nursery.start(run_fault_proxy, "127.0.0.1", upstream.port)
    spec = FakeResponseSpec(events=5, framing="length")
    with trio.fail_after(5):
        plain = await chaos_request(proxy.port, headers=spec.headers())
        head_len = len(plain.raw) - len(plain.body)
        proxy.add_toxic("limit_data", bytes=head_len + 123)
        cut = await chaos_request(proxy.port, headers=spec.headers())
    assert plain.complete
    assert cut.body == spec.expected_body()[:123]
    assert not cut.complete
    assert cut.closed_by_peer
