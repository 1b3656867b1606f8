"""The direct path (``LiveStream.wait_direct``): the stream task hands new chunks to a
caught-up subscriber's sink itself, waking that subscriber's task only when it must act.
No sockets: a scripted upstream and sinks that record what they were given."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import trio
import trio.testing

from keepstream import Config, JournalConfig, Route, ServerConfig, open_proxy
from keepstream._supervisor import SINK_BLOCKED, SINK_REFUSED, SINK_TAKEN, LiveStream


class Feed(httpx.AsyncBaseTransport):
    """An upstream whose body chunks the test sends, one by one, on a memory channel."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[bytes](100)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        receive = self._receive

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


async def test_sink_takes_chunks_without_waking_the_subscriber(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = Feed()
    async with httpx.AsyncClient(transport=feed) as http, open_proxy(_config(), client=http) \
            as proxy:
        stream = await _start(proxy, feed)
        sub = stream.subscribe()
        got: list[bytes] = []
        replies = [SINK_TAKEN, SINK_TAKEN, SINK_BLOCKED]

        def sink(data: bytes) -> int:
            got.append(data)
            return replies.pop(0)

        woke_at: list[int] = []

        async def subscriber() -> None:
            await stream.wait_direct(sub, sink)
            woke_at.append(len(got))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber)
            await trio.sleep(1)
            for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
                await feed.send.send(chunk)
                await trio.sleep(1)
            assert got == [b"data: 1\n\n", b"data: 2\n\n"]
            assert sub.offset == stream.end == 18 and woke_at == []  # still asleep
            await feed.send.send(b"data: 3\n\n")  # the socket takes part of it: wake up
            await trio.sleep(1)
            assert woke_at == [3] and sub.must_flush and sub.offset == 27
            assert sub.sink is None and stream._sinks == 0
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
        # Not caught up: wait_direct returns at once, the sink is never attached.
        await stream.wait_direct(sub, lambda data: SINK_TAKEN)
        assert sub.sink is None and sub.offset == 0
        sub.offset = stream.end
        refused: list[bytes] = []

        def sink(data: bytes) -> int:
            refused.append(data)
            return SINK_REFUSED

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.wait_direct, sub, sink)
            await trio.sleep(1)
            await feed.send.send(b"data: 1\n\n")
            await trio.sleep(1)
        # Woken with the chunk still to send: offset not advanced, the read gives it.
        assert refused == [b"data: 1\n\n"] and sub.offset == 9 and not sub.must_flush
        assert stream.read(sub) == b"data: 1\n\n"
        sub.offset = stream.end
        other = stream.subscribe(stream.end)  # a second subscriber without a sink
        taken: list[bytes] = []

        def keep(data: bytes) -> int:
            taken.append(data)
            return SINK_TAKEN

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.wait_direct, sub, keep)
            await trio.sleep(1)
            await feed.send.send(b"data: 2\n\n")
            await trio.sleep(1)
            assert taken == [b"data: 2\n\n"] and sub.offset == stream.end
            assert other.offset == 18 < stream.end  # the other one reads it itself
            await feed.send.aclose()  # the stream finishes: the waiting subscriber returns
        assert stream.finished and stream.record.status == "completed"
        stream.unsubscribe(sub, client_left=False)
        stream.unsubscribe(other, client_left=False)
        assert stream._sinks == 0
