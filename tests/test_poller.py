"""The upstream poller (``keepstream._poller``) and the stream's polled relay
(``LiveStream._relay_polled``): one task reads every waiting upstream socket, and a stream task
steps only when it must act.

Three levels, all on real sockets (127.0.0.1, port 0, socketpairs; each test bounded by
``trio.fail_after``): the poller alone (level-triggered reports, discard, yielding between
rounds, its end); ``_Body.read_nowait`` interleaved with ``async for`` on one body; and whole
streams through ``open_proxy`` against a raw upstream: byte-exact records, no task step per
event, idle deadline, cancel, journal backpressure and the poller stopping mid-stream.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel

from keepstream import Config, ConfigError, JournalConfig, Route, ServerConfig, open_proxy
from keepstream._poller import MAX_EVENTS, UpstreamPoller
from keepstream._proxy import StreamHandle
from keepstream._state import Ending
from keepstream._supervisor import LiveStream, Supervisor
from keepstream._transport import RAW_BODY, FastTransport, _Body

from .test_transport import read_request, start

# -- the poller alone --------------------------------------------------------------------------


class Reader:
    """A poll target that reads up to ``size`` bytes per call (leaving the rest readable)."""

    def __init__(self, sock: socket.socket, size: int = 65536) -> None:
        self.sock = sock
        self.size = size
        self.got = b""
        self.calls = 0
        self.gone = False
        self.arrived = trio.Event()

    def on_readable(self) -> None:
        self.calls += 1
        try:
            self.got += self.sock.recv(self.size)
        except BlockingIOError:
            return
        self.arrived.set()

    def on_poller_gone(self) -> None:
        self.gone = True


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await trio.sleep(0.001)


async def test_poller_reads_ready_sockets_until_discarded(nursery: trio.Nursery) -> None:
    poller = UpstreamPoller()
    await nursery.start(poller.run)
    (a1, b1), (a2, b2) = _pair(), _pair()
    r1, r2 = Reader(a1), Reader(a2)
    with a1, b1, a2, b2, trio.fail_after(5):
        assert poller.add(a1.fileno(), r1) and poller.add(a2.fileno(), r2)
        assert len(poller) == 2
        b1.send(b"one")
        await r1.arrived.wait()
        assert (r1.got, r2.calls) == (b"one", 0)  # only the ready socket's target ran
        poller.discard(a1.fileno())
        poller.discard(a1.fileno())  # a second discard is a no-op
        b1.send(b"ignored")
        b2.send(b"two")
        await r2.arrived.wait()
        assert r2.got == b"two"
        assert r1.got == b"one"  # discarded: not read again
        assert len(poller) == 1
        poller.stop()


async def test_poller_is_level_triggered(nursery: trio.Nursery) -> None:
    """A target that leaves bytes unread is called again, without another send."""
    poller = UpstreamPoller()
    await nursery.start(poller.run)
    a, b = _pair()
    reader = Reader(a, size=2)
    with a, b, trio.fail_after(5):
        poller.add(a.fileno(), reader)
        b.send(b"abcdef")
        await _until(lambda: reader.got == b"abcdef")
        assert reader.calls == 3
        poller.stop()


async def test_poller_yields_between_rounds(nursery: trio.Nursery) -> None:
    """More ready sockets than ``MAX_EVENTS``, none ever drained: the poller runs round after
    round, at most ``MAX_EVENTS`` handlers per round, and another task gets a turn between
    any two rounds."""
    poller = UpstreamPoller()
    await nursery.start(poller.run, name="the poller")
    step = 0
    per_step: dict[int, int] = {}

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal step
            if task.name == "the poller":
                step += 1

    class Counting(Reader):
        def on_readable(self) -> None:
            per_step[step] = per_step.get(step, 0) + 1
            super().on_readable()

    pairs = [_pair() for _ in range(MAX_EVENTS + 10)]
    readers = [Counting(a, size=0) for a, _ in pairs]  # recv(0): reads nothing, stays ready
    try:
        with trio.fail_after(5):
            for (a, b), reader in zip(pairs, readers, strict=True):
                poller.add(a.fileno(), reader)
                b.send(b"x")
            trio.lowlevel.add_instrument(Steps())
            while min(r.calls for r in readers) < 3:
                await trio.lowlevel.checkpoint()  # this task's turns: it is never starved
        assert max(per_step.values()) <= MAX_EVENTS  # per step of the poller task
        assert sum(per_step.values()) >= 3 * len(readers)
        poller.stop()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_stopped_poller_tells_its_targets_and_refuses_new_ones(
    nursery: trio.Nursery,
) -> None:
    poller = UpstreamPoller()
    await nursery.start(poller.run)
    a, b = _pair()
    reader = Reader(a)
    with a, b, trio.fail_after(5):
        poller.add(a.fileno(), reader)
        poller.stop()
        await _until(lambda: poller.closed)
        assert reader.gone
        assert not poller.add(a.fileno(), Reader(a))
        assert len(poller) == 0
        poller.discard(a.fileno())  # no-op on a closed poller


async def test_create_gives_a_poller_here() -> None:
    poller = UpstreamPoller.create()
    assert isinstance(poller, UpstreamPoller)  # Linux: epoll


# -- one body, read both ways ------------------------------------------------------------------


async def _open_body(
    nursery: trio.Nursery, wire: bytes, hold: trio.Event
) -> tuple[httpx.AsyncClient, httpx.Response, _Body]:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(wire[: len(wire) // 2])
        await hold.wait()
        await stream.send_all(wire[len(wire) // 2 :])
        await stream.aclose()

    server = await start(nursery, handler)
    client = httpx.AsyncClient(transport=FastTransport(), timeout=None)  # (no read timeout)
    request = client.build_request("GET", f"http://127.0.0.1:{server.port}/")
    resp = await client.send(request, stream=True)
    body = resp.extensions[RAW_BODY]
    assert isinstance(body, _Body)
    return client, resp, body


async def _read_nowait_until(body: _Body, want: int, got: bytearray) -> None:
    while len(got) < want and not body.complete:
        piece = body.read_nowait()
        if not piece:
            await trio.lowlevel.wait_readable(body.fd)
        got += piece


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_read_nowait_then_async_for_gives_the_exact_body(
    nursery: trio.Nursery, framing: str
) -> None:
    payload = bytes(range(256)) * 20
    pieces = [payload[i:i + 700] for i in range(0, len(payload), 700)]
    if framing == "chunked":
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "length":
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    else:
        wire = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + payload
    hold = trio.Event()
    with trio.fail_after(5):
        client, resp, body = await _open_body(nursery, wire, hold)
        assert body.pollable
        got = bytearray()
        await _read_nowait_until(body, 1000, got)  # some of it without awaiting reads
        assert 1000 <= len(got) < len(payload)
        hold.set()
        async for piece in body:  # the rest through trio: it picks up where that stopped
            got += piece
        assert bytes(got) == payload and body.complete
        assert not body.pollable  # nothing left to read
        await resp.aclose()
        await client.aclose()


async def _read_nowait_to_error(
    nursery: trio.Nursery, wire: bytes, match: str
) -> tuple[bytes, bytes]:
    """Read a ``wire`` response with ``read_nowait`` until the error ``match`` names; return
    what was read and the body's ``partial`` bytes (framed but not yet handed out)."""
    hold = trio.Event()
    hold.set()
    client, resp, body = await _open_body(nursery, wire, hold)
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError, match=match):
        await _read_nowait_until(body, 10**6, got)
    await resp.aclose()
    await client.aclose()
    return bytes(got), body.partial


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_read_nowait_body_cut_short(nursery: trio.Nursery, framing: str) -> None:
    if framing == "chunked":
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwor"
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhellowor"
    with trio.fail_after(5):
        got = await _read_nowait_to_error(nursery, wire, "closed the connection")
    assert got == (b"hellowor", b"")


async def test_read_nowait_framing_error_keeps_the_bytes_before_it(
    nursery: trio.Nursery,
) -> None:
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\nzz\r\n")
    with trio.fail_after(5):
        got, partial = await _read_nowait_to_error(nursery, wire, "malformed chunk size")
    assert got + partial == b"hello"


# -- whole streams -----------------------------------------------------------------------------


class Upstream:
    """A raw chunked SSE upstream whose events the test releases one by one."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[bytes | None](100)
        self.closed = trio.Event()

    async def handler(self, stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_events, stream)
            try:
                await stream.receive_some(1)  # b"": keepstream closed the connection
            except trio.BrokenResourceError:
                pass  # closed with bytes unread: a reset
            self.closed.set()
            nursery.cancel_scope.cancel()

    async def _send_events(self, stream: trio.SocketStream) -> None:
        async for event in self._receive:
            try:
                await stream.send_all(b"0\r\n\r\n" if event is None else
                                      b"%x\r\n%b\r\n" % (len(event), event))
            except trio.BrokenResourceError:
                return  # keepstream closed it first


def _config(port: int, journal_url: str, poller: bool = True, **route_kw: Any) -> Config:
    return Config(
        routes=(Route(prefix="/", upstream=f"http://127.0.0.1:{port}", **route_kw),),
        server=ServerConfig(drain_timeout=1.0, stop_grace=10.0, upstream_poller=poller),
        journal=JournalConfig(url=journal_url, flush_interval_ms=5),
    )


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks whose names start with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith(self.prefix):
            self.steps += 1


class FirstStep(trio.abc.Instrument):
    """``probe()`` as it was when the named task first ran after this was added."""

    def __init__(self, name: str, probe: Callable[[], Any]) -> None:
        self.name = name
        self.probe = probe
        self.value: Any = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name and self.value is None:
            self.value = self.probe()


@dataclass
class Polled:
    upstream: Upstream
    sup: Supervisor
    handle: StreamHandle
    stream: LiveStream


@asynccontextmanager
async def _polled_stream(
    nursery: trio.Nursery, journal_url: str, first: bytes = b"data: 0\n\n"
) -> AsyncIterator[Polled]:
    """A proxy with one open stream whose ``first`` event came in through the poller."""
    upstream = Upstream()
    server = await start(nursery, upstream.handler)
    async with open_proxy(_config(server.port, journal_url)) as proxy:
        sup = proxy.supervisor
        async with proxy.open_stream("GET", "/events") as handle:
            await upstream.send.send(first)
            await _until(lambda: len(sup.poller) == 1)  # type: ignore[arg-type]
            stream = sup.live[handle.id]
            await _until(lambda: stream.end == len(first))
            yield Polled(upstream, sup, handle, stream)


async def _events(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield b"id: %d\ndata: event %d\n\n" % (i, i)


@pytest.mark.parametrize("poller", [True, False])
async def test_paced_events_cost_the_stream_task_no_step(
    nursery: trio.Nursery, journal_url: str, poller: bool
) -> None:
    """With the poller, twenty paced events take no step of the stream task; with
    ``server.upstream_poller = false`` the stream task reads each itself (a step per event).
    The record is the same either way."""
    upstream = Upstream()
    server = await start(nursery, upstream.handler)
    sent = b""
    with trio.fail_after(10):
        async with open_proxy(_config(server.port, journal_url, poller)) as proxy:
            sup = proxy.supervisor
            assert (sup.poller is not None) is poller
            async with proxy.open_stream("GET", "/events") as handle:
                await upstream.send.send(b"id: first\ndata: hello\n\n")
                sent += b"id: first\ndata: hello\n\n"
                first = await handle.__anext__()
                assert first == sent
                if poller:
                    await _until(lambda: len(sup.poller) == 1)  # type: ignore[arg-type]
                stream = sup.live[handle.id]
                counter = StepCounter(f"keepstream stream {handle.id}")
                trio.lowlevel.add_instrument(counter)
                try:
                    async for event in _events(20):
                        await upstream.send.send(event)
                        sent += event
                        want = len(sent)
                        await _until(lambda: stream.end == want)  # noqa: B023
                finally:
                    trio.lowlevel.remove_instrument(counter)
                # Twenty events read, relayed and counted by the poller: the stream task
                # itself never ran (through trio it takes a step per event).
                if poller:
                    assert counter.steps == 0
                else:
                    assert counter.steps >= 20
                assert stream.record.events == 21
                assert stream.record.last_event_id == "19"
                await upstream.send.send(None)
                body = b""
                async for piece in handle:
                    body += piece
                assert await handle.wait_finished() == "completed"
            assert not poller or len(sup.poller) == 0  # type: ignore[arg-type]
            row = await sup.writer.get(handle.id)
            data = await sup.writer.read_body(handle.id)
    assert row is not None and row["status"] == "completed" and row["bytes"] == len(sent)
    assert data == sent and first + body == sent


async def test_idle_deadline_ends_a_polled_stream(
    nursery: trio.Nursery, journal_url: str
) -> None:
    upstream = Upstream()
    server = await start(nursery, upstream.handler)
    with trio.fail_after(10):
        async with open_proxy(_config(server.port, journal_url, idle_timeout=0.3)) as proxy:
            sup = proxy.supervisor
            async with proxy.open_stream("GET", "/events") as handle:
                for i in range(3):
                    await upstream.send.send(b"data: %d\n\n" % i)
                    await trio.sleep(0.1)  # each re-arms the idle deadline (0.3 s)
                await _until(lambda: len(sup.poller) == 1)  # type: ignore[arg-type]
                assert handle.status == "open"
                status = await handle.wait_finished()  # then nothing: idle_timeout fires
            row = await sup.writer.get(handle.id)
            assert len(sup.poller) == 0  # type: ignore[arg-type]
            await upstream.closed.wait()  # the upstream connection was closed, not kept
    assert status == "timeout" and row is not None
    assert row["status"] == "timeout" and row["reason"] == "idle_timeout"
    assert row["bytes"] == len(b"data: 0\n\ndata: 1\n\ndata: 2\n\n")


async def test_cancel_ends_a_polled_stream_at_once(
    nursery: trio.Nursery, journal_url: str
) -> None:
    with trio.fail_after(10):
        async with _polled_stream(nursery, journal_url, b"data: a\n\n") as p:
            p.stream.stop(Ending.CANCEL_REQUESTED, "cancel requested")
            # Bytes that arrive after the stop are not read into the record.
            await p.upstream.send.send(b"data: late\n\n")
            assert await p.handle.wait_finished() == "cancelled"
            row = await p.sup.writer.get(p.handle.id)
            data = await p.sup.writer.read_body(p.handle.id)
            assert len(p.sup.poller) == 0  # type: ignore[arg-type]
            await p.upstream.closed.wait()
    assert row is not None and row["status"] == "cancelled"
    assert data == b"data: a\n\n"


async def test_journal_backlog_pauses_a_polled_stream(
    nursery: trio.Nursery, journal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(10):
        async with _polled_stream(nursery, journal_url) as p:
            sup, stream, writer = p.sup, p.stream, p.sup.writer
            full = trio.Event()
            waits = 0
            real_over, real_wait = writer.over_backlog, writer.wait_room

            def over_backlog() -> bool:
                return not full.is_set() or real_over()

            async def wait_room() -> None:
                nonlocal waits
                waits += 1
                await full.wait()
                await real_wait()

            monkeypatch.setattr(writer, "over_backlog", over_backlog)
            monkeypatch.setattr(writer, "wait_room", wait_room)
            seen = FirstStep(f"keepstream stream {p.handle.id}", lambda: len(sup.poller))  # type: ignore[arg-type]
            trio.lowlevel.add_instrument(seen)
            await p.upstream.send.send(b"data: 1\n\n")
            await _until(lambda: waits == 1)
            trio.lowlevel.remove_instrument(seen)
            # The poller task let go of the socket itself: by the time the stream task
            # runs, nothing reads it (level-triggered, it would be read again meanwhile).
            assert seen.value == 0
            # While the stream waits for room its socket is not watched: the next event
            # stays in the kernel (TCP backpressure), not in keepstream's memory.
            assert len(sup.poller) == 0  # type: ignore[arg-type]
            await p.upstream.send.send(b"data: 2\n\n")
            await trio.sleep(0.05)
            assert stream.end == len(b"data: 0\n\ndata: 1\n\n")
            full.set()
            await _until(lambda: stream.end == 3 * len(b"data: 0\n\n"))
            await p.upstream.send.send(None)
            assert await p.handle.wait_finished() == "completed"
            data = await writer.read_body(p.handle.id)
    assert data == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert waits == 1


async def test_stream_goes_on_through_trio_when_the_poller_stops(
    nursery: trio.Nursery, journal_url: str
) -> None:
    with trio.fail_after(10):
        async with _polled_stream(nursery, journal_url) as p:
            poller = p.sup.poller
            assert poller is not None
            poller.stop()
            await _until(lambda: poller.closed)
            for i in range(1, 4):
                await p.upstream.send.send(b"data: %d\n\n" % i)
            await _until(lambda: p.stream.end == 4 * len(b"data: 0\n\n"))
            await p.upstream.send.send(None)
            assert await p.handle.wait_finished() == "completed"
            data = await p.sup.writer.read_body(p.handle.id)
    assert data == b"".join(b"data: %d\n\n" % i for i in range(4))


def _scripted(first: bytes, go: trio.Event, then: bytes) -> Any:
    """A chunked SSE upstream: its head and ``first`` at once, ``then`` once ``go`` is set."""
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + first)
        await go.wait()
        await stream.send_all(then)
        await stream.receive_some(1)

    return handler


async def test_framing_error_keeps_the_bytes_before_it_in_the_record(
    nursery: trio.Nursery, journal_url: str
) -> None:
    """One read holds a whole event and then broken framing: the event is relayed and
    journalled, and the stream ends ``upstream_error``."""
    go = trio.Event()
    server = await start(nursery, _scripted(b"9\r\ndata: 0\n\n\r\n", go,
                                            b"9\r\ndata: 1\n\n\r\nzz\r\n"))
    with trio.fail_after(10):
        async with open_proxy(_config(server.port, journal_url)) as proxy:
            sup = proxy.supervisor
            async with proxy.open_stream("GET", "/events") as handle:
                await _until(lambda: len(sup.poller) == 1)  # type: ignore[arg-type]
                go.set()
                assert await handle.wait_finished() == "upstream_error"
            row = await sup.writer.get(handle.id)
            data = await sup.writer.read_body(handle.id)
    assert row is not None and "malformed chunk size" in row["reason"]
    assert data == b"data: 0\n\ndata: 1\n\n"


async def test_a_stopped_stream_reads_nothing_more(
    nursery: trio.Nursery, journal_url: str
) -> None:
    """Once a stream's scope is cancelled, the poller no longer watches its socket, before the
    stream task runs again (the cancellation's abort of its park lets the socket go): a round
    that already holds the socket as ready skips it, and the bytes stay in the socket."""
    upstream = Upstream()
    server = await start(nursery, upstream.handler)
    with trio.fail_after(10):
        async with open_proxy(_config(server.port, journal_url)) as proxy:
            sup = proxy.supervisor
            poller = sup.poller
            assert poller is not None
            async with proxy.open_stream("GET", "/events") as handle:
                await upstream.send.send(b"data: a\n\n")
                await _until(lambda: len(poller) == 1)
                stream = sup.live[handle.id]
                await _until(lambda: stream.end == len(b"data: a\n\n"))
                body = stream._poll_body
                assert body is not None
                poller.discard(body.fd)  # hold the poller off while the bytes arrive
                await upstream.send.send(b"data: late\n\n")
                await trio.lowlevel.wait_readable(body.fd)
                assert poller.add(body.fd, stream)  # watched again, with bytes waiting
                stream.stop(Ending.CANCEL_REQUESTED, "cancel requested")
                assert len(poller) == 0  # let go at once, in the same round
                assert stream.end == len(b"data: a\n\n")
                assert await handle.wait_finished() == "cancelled"
            data = await sup.writer.read_body(handle.id)
    assert data == b"data: a\n\n"


async def test_the_last_read_over_the_journal_backlog_still_ends_the_stream(
    nursery: trio.Nursery, journal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read brings an event and the end of the body while the journal is over its
    backlog: the stream waits for room, then ends (it does not wait for more)."""
    go = trio.Event()
    server = await start(nursery, _scripted(b"", go, b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"))
    waits = 0

    async def wait_room() -> None:
        nonlocal waits
        waits += 1
        await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with open_proxy(_config(server.port, journal_url, idle_timeout=30.0)) as proxy:
            sup = proxy.supervisor
            async with proxy.open_stream("GET", "/events") as handle:
                await _until(lambda: len(sup.poller) == 1)  # type: ignore[arg-type]
                monkeypatch.setattr(sup.writer, "over_backlog", lambda: True)
                monkeypatch.setattr(sup.writer, "wait_room", wait_room)
                go.set()
                with trio.fail_after(2):  # well before the idle deadline
                    assert await handle.wait_finished() == "completed"
                monkeypatch.undo()
            data = await sup.writer.read_body(handle.id)
    assert data == b"data: 1\n\n" and waits == 1


def test_upstream_poller_key_is_a_boolean() -> None:
    assert Config().server.upstream_poller is True
    cfg = Config.from_mapping({"server": {"upstream_poller": False}})
    assert cfg.server.upstream_poller is False
    with pytest.raises(ConfigError, match=r"server\.upstream_poller.*must be true or false"):
        Config.from_mapping({"server": {"upstream_poller": 1}}).validate()
