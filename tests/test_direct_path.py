"""The direct path (``LiveStream.wait_direct``, ``wait_ready``): the stream task writes the
response head and hands new chunks to a caught-up subscriber's direct path itself, waking that
subscriber's task only when it must act, and the parked subscriber learns from the same path
that its client left. No sockets: a scripted upstream and direct paths that record what they
were given (the lean engine's real one is tested over sockets in test_lean_engine.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio
import trio.testing

from keepstream import Config, JournalConfig, Route, ServerConfig, open_proxy
from keepstream._poller import UpstreamPoller
from keepstream._supervisor import (
    SINK_BLOCKED,
    SINK_REFUSED,
    SINK_TAKEN,
    LiveStream,
    Subscriber,
)


class Feed(httpx.AsyncBaseTransport):
    """An upstream whose body chunks the test sends, one by one, on a memory channel."""

    def __init__(self, answer: trio.Event | None = None) -> None:
        self.send, self._receive = trio.open_memory_channel[bytes](100)
        self.answer = answer  # when given: the response head waits for it

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        receive = self._receive
        if self.answer is not None:
            await self.answer.wait()

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in receive:
                    yield chunk

        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Body())


def _config() -> Config:
    return Config(routes=(Route(prefix="/", upstream="http://upstream.invalid"),),
                  server=ServerConfig(drain_timeout=1.0, stop_grace=10.0),
                  journal=JournalConfig(url="memory:"))


async def _start(proxy: object, feed: Feed) -> LiveStream:
    sup = proxy.supervisor  # type: ignore[attr-defined]
    route = sup.config.routes[0]
    stream: LiveStream = await sup.start_stream(route, "GET", "/s", "http://upstream.invalid/s",
                                                [], b"")
    await stream.response_ready.wait()
    return stream


class Recorder:
    """A server's direct path as the lean engine's connection behaves (``_supervisor.Direct``):
    ``send_nowait`` answers from a script and records what it was given; ``wait_client``
    waits until ``wake()`` or until the test says the client left."""

    def __init__(self, replies: list[int] | None = None, default: int = SINK_TAKEN,
                 start: int = SINK_REFUSED) -> None:
        self.replies = replies or []
        self.default = default
        self.start = start  # start_nowait's answer
        self.heads: list[tuple[int, list[tuple[bytes, bytes]]]] = []
        self.got: list[bytes] = []
        self.wakes = 0
        self.gone = False
        self._event = trio.Event()

    def send_nowait(self, body: bytes) -> int:
        self.got.append(body)
        return self.replies.pop(0) if self.replies else self.default

    def start_nowait(self, status: int, headers: list[tuple[bytes, bytes]]) -> int:
        self.heads.append((status, headers))
        return self.start

    def wake(self) -> None:
        self.wakes += 1
        self._event.set()

    def leave(self) -> None:
        self.gone = True
        self._event.set()

    async def wait_client(self, poller: UpstreamPoller | None = None) -> bool:
        if self.gone:
            return True
        self._event = trio.Event()
        await self._event.wait()
        return self.gone

    def client_gone(self) -> bool:
        return self.gone


async def test_direct_path_takes_chunks_without_waking_the_subscriber(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = Feed()
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        stream = await _start(proxy, feed)
        sub = stream.subscribe()
        direct = Recorder([SINK_TAKEN, SINK_TAKEN, SINK_BLOCKED])
        woke: list[tuple[int, bool]] = []

        async def subscriber() -> None:
            left = await stream.wait_direct(sub, direct)
            woke.append((len(direct.got), left))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber)
            await trio.sleep(1)
            for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
                await feed.send.send(chunk)
                await trio.sleep(1)
            assert direct.got == [b"data: 1\n\n", b"data: 2\n\n"]
            assert sub.offset == stream.end == 18 and woke == []  # still asleep
            await feed.send.send(b"data: 3\n\n")  # the socket takes part of it: wake up
            await trio.sleep(1)
            assert woke == [(3, False)] and sub.must_flush and sub.offset == 27
            assert direct.wakes == 1 and sub.direct is None and stream._parked == 0
        await feed.send.aclose()
        await stream.done.wait()
        assert stream.record.status == "completed"


async def test_a_refused_chunk_is_left_for_the_subscriber_and_finish_wakes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = Feed()
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        stream = await _start(proxy, feed)
        sub = stream.subscribe()
        await feed.send.send(b"data: 0\n\n")
        await trio.sleep(1)
        # Not caught up: wait_direct returns at once, nothing is parked.
        never = Recorder()
        assert await stream.wait_direct(sub, never) is False
        assert sub.direct is None and sub.offset == 0 and never.got == []
        sub.offset = stream.end
        refusing = Recorder(default=SINK_REFUSED)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.wait_direct, sub, refusing)
            await trio.sleep(1)
            await feed.send.send(b"data: 1\n\n")
            await trio.sleep(1)
        # Woken with the chunk still to send: offset not advanced, the read gives it.
        assert refusing.got == [b"data: 1\n\n"] and refusing.wakes == 1
        assert sub.offset == 9 and not sub.must_flush
        assert stream.read(sub) == b"data: 1\n\n"
        sub.offset = stream.end
        other = stream.subscribe(stream.end)  # a second subscriber without a direct path
        keep = Recorder()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.wait_direct, sub, keep)
            await trio.sleep(1)
            await feed.send.send(b"data: 2\n\n")
            await trio.sleep(1)
            assert keep.got == [b"data: 2\n\n"] and sub.offset == stream.end
            assert keep.wakes == 0
            assert other.offset == 18 < stream.end  # the other one reads it itself
            await feed.send.aclose()  # the stream finishes: the parked subscriber is woken
        assert keep.wakes == 1
        assert stream.finished and stream.record.status == "completed"
        stream.unsubscribe(sub, client_left=False)
        stream.unsubscribe(other, client_left=False)
        assert stream._parked == 0


async def test_a_client_that_leaves_while_parked_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = Feed()
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        stream = await _start(proxy, feed)
        sub = stream.subscribe()
        direct = Recorder()
        left: list[bool] = []

        async def subscriber() -> None:
            left.append(await stream.wait_direct(sub, direct))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber)
            await trio.sleep(1)
            direct.leave()
        assert left == [True] and sub.direct is None and stream._parked == 0
        # Unparked: later chunks are not handed to the departed client's path.
        await feed.send.send(b"data: 1\n\n")
        await trio.sleep(1)
        assert direct.got == [] and sub.offset == 0
        stream.unsubscribe(sub, client_left=True)
        await feed.send.aclose()
        await stream.done.wait()


async def test_wait_ready_parks_until_the_headers_and_hands_off_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = Feed()
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        sup = proxy.supervisor
        stream = await sup.start_stream(sup.config.routes[0], "GET", "/s",
                                        "http://upstream.invalid/s", [], b"")
        sub = stream.subscribe()
        direct = Recorder()
        assert await stream.wait_ready(sub, direct) is False  # woken by the response head
        assert stream.response_ready.is_set() and direct.wakes == 1 and direct.got == []
        # A client that left before the head: True at once.
        gone = Recorder()
        gone.leave()
        late = LiveStream(sup, stream.record, stream.route, stream.url, [], b"")
        assert await late.wait_ready(late.subscribe(), gone) is True
        await feed.send.aclose()
        await stream.done.wait()
        stream.unsubscribe(sub, client_left=False)


@asynccontextmanager
async def _relay_parked_for_the_head(
    start: int,
) -> AsyncIterator[tuple[LiveStream, Subscriber, Recorder, list[bool], Feed, trio.Event]]:
    """A relay task parked in ``wait_ready`` with a path whose ``start_nowait`` answers
    ``start``, before the upstream's head (``answer`` lets it come); leaving the block waits
    for the relay, ends the upstream body and the stream."""
    answer = trio.Event()
    feed = Feed(answer)
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        sup = proxy.supervisor
        stream = await sup.start_stream(sup.config.routes[0], "GET", "/s",
                                        "http://upstream.invalid/s", [], b"")
        sub = stream.subscribe()
        direct = Recorder(start=start)
        woke: list[bool] = []

        async def relay() -> None:
            woke.append(await stream.wait_ready(sub, direct))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            await trio.sleep(1)
            assert sub.direct is direct and direct.heads == []  # parked, before the head
            yield stream, sub, direct, woke, feed, answer
        await feed.send.aclose()
        await stream.done.wait()
        stream.unsubscribe(sub, client_left=False)


async def test_the_stream_task_writes_the_head_and_the_chunks_while_the_relay_sleeps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A relay parked in ``wait_ready`` whose path takes the head: the stream task writes the
    head (the upstream's headers and the stream id) when the upstream's head is in, then each
    chunk, and wakes the relay only for the end; the relay then must not send the head."""
    async with _relay_parked_for_the_head(SINK_TAKEN) as (stream, sub, direct, woke, feed,
                                                          answer):
        answer.set()
        await trio.sleep(1)
        assert len(direct.heads) == 1 and direct.wakes == 0 and woke == []
        status, headers = direct.heads[0]
        assert status == 200 and (b"content-type", b"text/event-stream") in headers
        assert headers[-1] == (b"keepstream-id", stream.record.id.encode())
        assert sub.started and sub.takes and not sub.starts
        for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
            await feed.send.send(chunk)
            await trio.sleep(1)
        assert direct.got == [b"data: 1\n\n", b"data: 2\n\n"] and woke == []
        assert sub.offset == stream.end == 18
        await feed.send.aclose()  # the end: the relay wakes, once
    assert woke == [False] and direct.wakes == 1 and len(direct.heads) == 1
    assert stream.record.status == "completed"


async def test_a_head_the_socket_takes_part_of_wakes_the_relay_to_flush_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _relay_parked_for_the_head(SINK_BLOCKED) as (stream, sub, direct, woke, _,
                                                            answer):
        answer.set()
        await trio.sleep(1)
        assert woke == [False] and direct.wakes == 1 and len(direct.heads) == 1
        assert sub.started and sub.must_flush and not sub.takes
        assert sub.direct is None and stream._parked == 0
