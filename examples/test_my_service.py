"""Test your service's disconnect and deploy behaviour behind keepstream: copy this file.

Nothing here is private to keepstream: it uses only the pytest fixtures that ``pip install
keepstream`` brings (the plugin loads itself through the ``pytest11`` entry point) and the public
helpers of :mod:`keepstream.testing`::

    pip install keepstream pytest pytest-trio
    python -m pytest test_my_service.py

Fixtures: ``fake_upstream`` (a scriptable origin: each request picks its behaviour with
``X-Fake-*`` headers, built here from a :class:`~keepstream.testing.FakeResponseSpec`),
``keepstream_factory`` (``async with keepstream_factory(config) as ks`` serves keepstream on a
loopback port), ``fault_proxy_factory`` (a Toxiproxy-like TCP proxy to put between keepstream and
the upstream) and ``keepstream_journal_url`` (a SQLite journal in the test's temporary
directory). To aim the same tests at your real service, put its URL in the route instead of
``fake_upstream.url`` and drop the ``X-Fake-*`` headers.

Every test checks what keepstream promises: one record per stream with one terminal status,
whose journaled body is a byte-exact prefix of what the upstream sent (all of it when
``completed``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal

import pytest
import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream.testing import (
    ChaosResult,
    FakeResponseSpec,
    FakeUpstream,
    FaultProxy,
    RunningKeepstream,
    chaos_request,
)

# Without ``trio_mode = true`` in your pytest configuration, mark the async tests for pytest-trio.
pytestmark = pytest.mark.trio

KeepstreamFactory = Callable[[Config], AbstractAsyncContextManager[RunningKeepstream]]
FaultProxyFactory = Callable[[int], Awaitable[FaultProxy]]


def my_config(
    upstream_url: str,
    journal_url: str,
    *,
    on_disconnect: Literal["finish", "cancel"] = "finish",
    drain_timeout: float = 2.0,
) -> Config:
    """Your keepstream configuration, with the upstream and the journal swapped for the test."""
    return Config(
        routes=(Route(prefix="/v1/", upstream=f"{upstream_url}/v1/", on_disconnect=on_disconnect),),
        server=ServerConfig(drain_timeout=drain_timeout, stop_grace=10.0),
        journal=JournalConfig(url=journal_url),
    )


def stream_id(res: ChaosResult) -> str:
    """keepstream names every stream in the ``Keepstream-Id`` response header."""
    value = res.header("keepstream-id")
    assert value is not None, f"no Keepstream-Id header: {res.status} {res.error}"
    return value.decode()


async def test_client_leaves_mid_answer_and_the_journal_keeps_all_of_it(
    fake_upstream: FakeUpstream, keepstream_factory: KeepstreamFactory,
    keepstream_journal_url: str,
) -> None:
    """``on_disconnect = "finish"``: the stream outlives its client."""
    spec = FakeResponseSpec(events=20, interval=0.01)  # an LLM-style SSE answer, 20 deltas
    with trio.fail_after(20):
        async with keepstream_factory(my_config(fake_upstream.url, keepstream_journal_url)) as ks:
            res = await chaos_request(
                ks.port, "POST", "/v1/chat/completions", headers=spec.headers(),
                body=b'{"stream": true}', disconnect_after_events=3,
            )
            assert res.status == 200 and res.events == 3
            rec = await ks.wait_terminal(stream_id(res))
            body = await ks.body(stream_id(res))
    assert rec["status"] == "completed"
    assert rec["client_gone_at"] is not None  # the record says the client left
    assert body == spec.expected_body()  # ... and still holds the whole answer
    assert rec["bytes"] == len(body)


async def test_client_leaves_under_cancel_and_the_upstream_is_stopped(
    fake_upstream: FakeUpstream, keepstream_factory: KeepstreamFactory,
    keepstream_journal_url: str,
) -> None:
    """``on_disconnect = "cancel"``: the upstream request ends with the client."""
    spec = FakeResponseSpec(events=200, interval=0.01)
    cfg = my_config(fake_upstream.url, keepstream_journal_url, on_disconnect="cancel")
    with trio.fail_after(20):
        async with keepstream_factory(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/v1/chat", headers=spec.headers(),
                                      disconnect_after_events=5)
            rec = await ks.wait_terminal(stream_id(res))
            body = await ks.body(stream_id(res))
            exchange = fake_upstream.exchanges[-1]
            await exchange.done.wait()
    assert rec["status"] == "cancelled"
    assert exchange.peer_closed_first  # keepstream closed the upstream connection early
    assert bytes(exchange.body_sent).startswith(body)  # the journal has what was sent, exactly
    assert len(body) >= len(res.body)


async def test_upstream_reset_mid_stream_is_an_upstream_error(
    fake_upstream: FakeUpstream, keepstream_factory: KeepstreamFactory,
    keepstream_journal_url: str,
) -> None:
    spec = FakeResponseSpec(events=10, style="plain", reset_after=250)  # RST after 250 bytes
    full = FakeResponseSpec(events=10, style="plain").expected_body()
    with trio.fail_after(20):
        async with keepstream_factory(my_config(fake_upstream.url, keepstream_journal_url)) as ks:
            res = await chaos_request(ks.port, "GET", "/v1/events", headers=spec.headers())
            rec = await ks.wait_terminal(stream_id(res))
            body = await ks.body(stream_id(res))
    assert res.status == 200
    assert not res.complete  # the client never sees a clean end of a broken stream
    assert rec["status"] == "upstream_error"
    assert body == full[:250]  # exactly the bytes that crossed before the reset


async def test_flaky_network_between_keepstream_and_the_upstream(
    fake_upstream: FakeUpstream, keepstream_factory: KeepstreamFactory,
    fault_proxy_factory: FaultProxyFactory, keepstream_journal_url: str,
) -> None:
    proxy = await fault_proxy_factory(fake_upstream.port)
    # "downstream" is upstream -> keepstream, as in Toxiproxy.
    proxy.add_toxic("latency", stream="downstream", latency=30, jitter=20)
    proxy.add_toxic("slicer", stream="downstream", average_size=7, size_variation=3, delay=100)
    spec = FakeResponseSpec(events=10, style="plain")
    with trio.fail_after(20):
        async with keepstream_factory(my_config(proxy.url, keepstream_journal_url)) as ks:
            # Slow and sliced: still forwarded byte for byte.
            res = await chaos_request(ks.port, "GET", "/v1/events", headers=spec.headers())
            assert res.complete and res.body == spec.expected_body()
            rec = await ks.wait_terminal(stream_id(res))
            assert rec["status"] == "completed"

            # The link dies after 600 bytes (head and chunk framing included).
            proxy.add_toxic("limit_data", stream="downstream", bytes=600)
            res = await chaos_request(ks.port, "GET", "/v1/events", headers=spec.headers())
            rec = await ks.wait_terminal(stream_id(res))
            body = await ks.body(stream_id(res))
    assert not res.complete
    assert rec["status"] == "upstream_error"
    assert 0 < len(body) < 600 and spec.expected_body().startswith(body)


async def test_deploy_interrupts_and_the_sse_client_gets_a_reconnect_event(
    fake_upstream: FakeUpstream, keepstream_factory: KeepstreamFactory,
    keepstream_journal_url: str,
) -> None:
    """A deploy (SIGTERM) drains for ``drain_timeout``, then interrupts what is still running."""
    spec = FakeResponseSpec(events=500, interval=0.01, style="plain")  # ~5 s: outlives the drain
    cfg = my_config(fake_upstream.url, keepstream_journal_url, drain_timeout=0.5)
    results: list[ChaosResult] = []
    with trio.fail_after(20):
        async with keepstream_factory(cfg) as ks:

            async def listen() -> None:
                results.append(await chaos_request(ks.port, "GET", "/v1/events",
                                                   headers=spec.headers()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                await fake_upstream.wait_exchanges(1)
                await trio.sleep(0.2)  # a few events flow
                ks.stop()  # what SIGTERM does
            res = results[0]
            rec = await ks.wait_terminal(stream_id(res))
            body = await ks.body(stream_id(res))
    assert rec["status"] == "interrupted"
    assert spec.expected_body().startswith(body)  # the journal: an exact prefix
    # The client got everything journaled, then a last event telling it where to resume, and a
    # proper end of response.
    assert res.complete
    before, marker, after = res.body.partition(b"event: keepstream-reconnect\n")
    assert marker, res.body[-300:]
    assert before in (body, body + b"\n\n")  # "\n\n" ends an event the cut left open
    data = next(line for line in after.split(b"\n") if line.startswith(b"data: "))
    resume = json.loads(data[len(b"data: "):])
    assert resume["keepstream_id"] == stream_id(res)
    assert resume["status"] == "interrupted"
    assert 0 < resume["offset"] <= len(body)  # resume at an event boundary
    assert body[: resume["offset"]].endswith(b"\n\n")
