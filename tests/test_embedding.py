"""The library contract of ``open_proxy`` / ``proxy.open_stream`` (DESIGN section 4, Library).

* Leaving ``open_proxy`` with live streams drains (bounded by ``drain_delay + drain_timeout``),
  interrupts the rest and persists every record; no keepstream task outlives the block.
* A handler leaving ``open_stream`` early counts as the client leaving: the route's
  ``on_disconnect`` policy decides (``finish``: completed, full body; ``cancel``: cancelled,
  strict prefix).
* Exception policy (``keepstream._proxy`` docstring): the block's own exception propagates
  unchanged; a failed keepstream task becomes ``ProxyError`` from the group; cancellation
  propagates as usual.
* ``open_stream`` validates and routes exactly like an incoming request.

Loopback only, every test bounded by ``trio.fail_after``; journals ``sqlite:///`` and ``memory:``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from keepstream import (
    Config,
    JournalConfig,
    Proxy,
    RequestRejected,
    Route,
    ServerConfig,
    StreamRefused,
    open_proxy,
)
from keepstream._journal import Backend, open_backend
from keepstream.testing import FakeResponseSpec, FakeUpstream

DRAIN = 0.5  # drain_timeout used where the drain bound is measured


@pytest.fixture(params=["sqlite", "memory"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/j.db" if request.param == "sqlite" else "memory:"


def _config(upstream_url: str, journal_url: str, *, drain_timeout: float = 2.0) -> Config:
    base = upstream_url + "/v1/"
    return Config(
        routes=(
            Route(prefix="/f/", upstream=base, on_disconnect="finish"),
            Route(prefix="/c/", upstream=base, on_disconnect="cancel"),
        ),
        server=ServerConfig(drain_timeout=drain_timeout, stop_grace=10.0),
        journal=JournalConfig(url=journal_url, flush_interval_ms=20),
    )


def _reopen(journal_url: str, live: Backend) -> Backend:
    """A backend to read the journal after ``open_proxy`` closed its own."""
    if journal_url == "memory:":
        return live  # MemoryBackend.close() keeps the dicts
    backend = open_backend(journal_url)
    backend.setup()
    return backend


_KEEPSTREAM_TASK = re.compile(r"^keepstream[ .](?!testing)")


def _keepstream_tasks() -> list[str]:
    """Names of every task in this run that belongs to keepstream itself (not its toolkit)."""
    names: list[str] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is not None:
            if _KEEPSTREAM_TASK.match(task.name):
                names.append(task.name)
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
    return names


async def _read_all(proxy: Proxy, path: str, spec: FakeResponseSpec,
                    first: trio.Event, out: dict[str, Any]) -> None:
    """A handler that keeps reading its stream, even after the proxy block is left."""
    async with proxy.open_stream("GET", path, headers=spec.headers()) as handle:
        out["id"] = handle.id
        body = bytearray()
        async for chunk in handle:
            body += chunk
            first.set()
        out["body"] = bytes(body)
        out["status"] = handle.status


# -- (a) leaving open_proxy with live streams ------------------------------------------------


async def test_leaving_open_proxy_drains_interrupts_and_persists(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    short = FakeResponseSpec(events=4, event_size=60, interval=0.03)
    long = FakeResponseSpec(events=200, event_size=60, interval=0.05)
    cfg = _config(fake_upstream.url, journal, drain_timeout=DRAIN)
    readers: dict[str, dict[str, Any]] = {"short": {}, "long": {}}
    with trio.fail_after(20):
        async with trio.open_nursery() as handlers:  # outlives the proxy, like a server's
            nurseries = list(trio.lowlevel.current_task().child_nurseries)
            async with open_proxy(cfg) as proxy:
                backend = proxy.supervisor.writer.backend
                for name, spec in (("short", short), ("long", long)):
                    first = trio.Event()
                    handlers.start_soon(_read_all, proxy, "/f/chat", spec, first, readers[name],
                                        name=f"reader {name}")
                    await first.wait()
                # A handler that left early: its fetch goes on under "finish".
                async with proxy.open_stream("GET", "/f/chat", headers=long.headers()) as h:
                    async for _ in h:
                        break
                left_id = h.id
                assert len(proxy.supervisor.live) == 3
                running = _keepstream_tasks()  # the check below is not vacuous
                assert sum(n.startswith("keepstream stream ") for n in running) == 3
                assert any("writer" in n.lower() for n in running)  # the journal writer
                t0 = trio.current_time()
            elapsed = trio.current_time() - t0
            # Nothing of keepstream's is left running, and nothing is still live.
            assert proxy.supervisor.live == {}
            assert _keepstream_tasks() == []
            assert trio.lowlevel.current_task().child_nurseries == nurseries
            assert {t.name for t in handlers.child_tasks} <= {"reader short", "reader long"}
        server = cfg.server
        # Bounded by drain_delay + drain_timeout, then the interrupt and the persist.
        assert DRAIN - 0.05 <= elapsed <= server.drain_delay + DRAIN + server.persist_timeout + 1
    reader = _reopen(journal, backend)
    try:
        expected = {"short": short.expected_body(), "long": long.expected_body()}
        for name, want in (("short", "completed"), ("long", "interrupted")):
            out = readers[name]
            row = reader.get(out["id"])
            assert row is not None and row["status"] == want == out["status"], (name, row)
            body = reader.read_body(out["id"])
            assert body == out["body"]  # the handler saw exactly what was journaled
            assert row["bytes"] == len(body)
            if want == "completed":
                assert body == expected[name]
            else:
                assert 0 < len(body) < len(expected[name]) and expected[name].startswith(body)
                assert row["reason"]
        row = reader.get(left_id)
        assert row is not None and row["status"] == "interrupted"
        assert row["client_gone_at"] is not None
        body = reader.read_body(left_id)
        assert 0 < len(body) < len(expected["long"]) and expected["long"].startswith(body)
        assert [r["status"] for r in reader.list_records("open", 10)] == []
    finally:
        if reader is not backend:
            reader.close()


async def test_leaving_idle_open_proxy_is_prompt(fake_upstream: FakeUpstream,
                                                 journal: str) -> None:
    cfg = _config(fake_upstream.url, journal, drain_timeout=5.0)
    with trio.fail_after(10):
        async with open_proxy(cfg) as proxy:
            async with proxy.open_stream("GET", "/f/x") as h:
                body = b"".join([c async for c in h])
            t0 = trio.current_time()
        assert trio.current_time() - t0 < 1.0  # no stream left: the drain does not wait
        assert body == FakeResponseSpec().expected_body()
        assert _keepstream_tasks() == []


# -- (b) a handler leaving open_stream early -------------------------------------------------


@pytest.mark.parametrize(("prefix", "policy"), [("/f/", "finish"), ("/c/", "cancel")])
async def test_leaving_open_stream_early_applies_on_disconnect(
    fake_upstream: FakeUpstream, journal: str, prefix: str, policy: str
) -> None:
    spec = FakeResponseSpec(events=30, event_size=80, interval=0.02)
    expected = spec.expected_body()
    cfg = _config(fake_upstream.url, journal)
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            async with proxy.open_stream("GET", prefix + "chat", headers=spec.headers()) as h:
                assert h.status_code == 200
                async for chunk in h:
                    assert expected.startswith(chunk)
                    break
            status = await h.wait_finished()
            writer = proxy.supervisor.writer
            row = await writer.get(h.id)
            body = await writer.read_body(h.id)
        (ex,) = fake_upstream.exchanges
        await ex.done.wait()
    assert row is not None and row["client_gone_at"] is not None
    assert row["status"] == status == h.status
    assert row["bytes"] == len(body)
    if policy == "finish":
        assert status == "completed"
        assert body == expected
        assert ex.finished_writing
    else:
        assert status == "cancelled"
        assert 0 < len(body) < len(expected) and expected.startswith(body)
        assert not ex.finished_writing and ex.peer_closed_first


async def test_open_stream_read_to_the_end(fake_upstream: FakeUpstream, journal: str) -> None:
    spec = FakeResponseSpec(events=8, event_size=70, interval=0.01, seed=3)
    cfg = _config(fake_upstream.url, journal)
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            async with proxy.open_stream("POST", "/f/chat/completions?a=1",
                                         headers=[*spec.headers(),
                                                  ("Content-Type", "application/json")],
                                         body=b'{"stream":true}') as h:
                headers = dict(h.headers)
                body = b"".join([c async for c in h])
                assert h.status == "completed"  # iteration ends once the record is persisted
            assert await proxy.supervisor.writer.read_body(h.id) == body
    assert h.status_code == 200
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert body == spec.expected_body()
    (ex,) = fake_upstream.exchanges
    assert (ex.request_method, ex.request_target) == ("POST", "/v1/chat/completions?a=1")
    assert ex.request_body == b'{"stream":true}'


async def test_open_stream_upstream_unreachable(journal: str) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(f"http://127.0.0.1:{port}", journal)
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            async with proxy.open_stream("GET", "/f/x") as h:
                chunks = [c async for c in h]
            assert h.status_code == 502
            assert chunks == []
            assert await h.wait_finished() == "upstream_error"


# -- (c) exception policy --------------------------------------------------------------------


@pytest.mark.parametrize("live_stream", [False, True])
async def test_body_exception_propagates_unchanged(
    fake_upstream: FakeUpstream, journal: str, live_stream: bool
) -> None:
    cfg = _config(fake_upstream.url, journal, drain_timeout=DRAIN)
    boom = ValueError("boom")
    spec = FakeResponseSpec(events=100, interval=0.05)
    seen: dict[str, Any] = {}

    async def body() -> None:
        async with open_proxy(cfg) as proxy:
            seen["proxy"] = proxy
            if live_stream:
                async with proxy.open_stream("GET", "/f/x", headers=spec.headers()) as h:
                    async for _ in h:
                        break
                seen["handle"] = h
            raise boom

    with trio.fail_after(20), pytest.raises(ValueError) as info:
        await body()
    assert info.value is boom
    assert not isinstance(info.value, BaseExceptionGroup)
    assert info.value.__cause__ is None
    assert _keepstream_tasks() == []
    assert seen["proxy"].supervisor.live == {}
    if live_stream:
        assert seen["handle"].status == "interrupted"


async def test_body_exception_group_propagates_as_is(fake_upstream: FakeUpstream,
                                                     journal: str) -> None:
    cfg = _config(fake_upstream.url, journal)

    async def fail() -> None:
        raise KeyError("mine")

    with trio.fail_after(20):
        with pytest.raises(BaseExceptionGroup) as info:
            async with open_proxy(cfg), trio.open_nursery() as nursery:
                nursery.start_soon(fail)
    group = info.value
    # The block's own group, not wrapped in keepstream's nurseries' groups, not a ProxyError.
    assert len(group.exceptions) == 1 and isinstance(group.exceptions[0], KeyError)


async def test_cancellation_propagates_as_usual(fake_upstream: FakeUpstream, journal: str) -> None:
    cfg = _config(fake_upstream.url, journal)
    with trio.fail_after(20):
        with trio.move_on_after(0.2) as scope:
            async with open_proxy(cfg):
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert _keepstream_tasks() == []


async def test_cancelled_from_outside_with_live_streams_persists_them(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    """The journal writer must outlive the stream tasks, or a
    stream interrupted by an outside cancellation may never persist its terminal status."""
    spec = FakeResponseSpec(events=200, event_size=60, interval=0.05)
    cfg = _config(fake_upstream.url, journal, drain_timeout=DRAIN)
    handles = []
    with trio.fail_after(20):
        with trio.CancelScope() as scope:
            async with open_proxy(cfg) as proxy:
                backend = proxy.supervisor.writer.backend
                for prefix in ("/f/", "/f/", "/c/"):
                    async with proxy.open_stream("GET", prefix + "x",
                                                 headers=spec.headers()) as h:
                        async for _ in h:
                            break
                    handles.append(h)
                scope.cancel()
                await trio.sleep_forever()
        assert _keepstream_tasks() == []
    reader = _reopen(journal, backend)
    try:
        statuses = []
        for h in handles:
            row = reader.get(h.id)
            assert row is not None
            statuses.append(row["status"])
            assert row["bytes"] == len(reader.read_body(h.id))
        assert statuses == ["interrupted", "interrupted", "cancelled"]
    finally:
        if reader is not backend:
            reader.close()


class _BuggyTransport(httpx.AsyncBaseTransport):
    """A transport with a bug: not an httpx error, so keepstream's stream task fails."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in a transport")


async def test_unexpected_error_in_a_stream_ends_that_stream_only(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    """A bug below one stream (here a custom transport raising RuntimeError) ends that stream
    ``upstream_error`` with a 502 and a logged traceback; the proxy and other streams go on."""
    cfg = _config("http://127.0.0.1:9", journal)
    with trio.fail_after(20):
        async with httpx.AsyncClient(transport=_BuggyTransport()) as client, \
                open_proxy(cfg, client=client) as proxy:
            async with proxy.open_stream("GET", "/f/x") as handle:
                assert handle.status_code == 502
                assert [c async for c in handle] == []
                assert await handle.wait_finished() == "upstream_error"
            row = await proxy.supervisor.writer.get(handle.id)
            assert row is not None
            assert row["reason"] == "internal error: RuntimeError"
            assert not proxy.draining and proxy.supervisor.live == {}
            # the proxy still serves: a second stream gets the same contained failure
            async with proxy.open_stream("GET", "/f/y") as again:
                assert again.status_code == 502


# -- (d) routing and refusals ----------------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [
    ("/nope", 404), ("/", 404), ("/f/../x", 400), ("/f/%2e%2e/x", 400), ("//f/x", 400),
    ("/f/\u00e9", 400), ("f/x", 400),
])
async def test_open_stream_rejects_like_an_incoming_request(
    fake_upstream: FakeUpstream, journal: str, path: str, status: int
) -> None:
    cfg = _config(fake_upstream.url, journal)
    with trio.fail_after(10):
        async with open_proxy(cfg) as proxy:
            with pytest.raises(RequestRejected) as info:
                async with proxy.open_stream("GET", path):
                    pytest.fail("open_stream yielded")
            assert info.value.status == status
            assert proxy.supervisor.started_total == 0
    assert fake_upstream.exchanges == []


async def test_open_stream_refused_while_draining(fake_upstream: FakeUpstream,
                                                  journal: str) -> None:
    cfg = _config(fake_upstream.url, journal)
    with trio.fail_after(10):
        async with open_proxy(cfg) as proxy:
            await proxy.aclose()
            assert proxy.draining
            with pytest.raises(StreamRefused) as info:
                async with proxy.open_stream("GET", "/f/x"):
                    pytest.fail("open_stream yielded")
            assert info.value.status == 503
    assert fake_upstream.exchanges == []


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_an_embedders_transport_may_answer_a_response_read_already(
    journal: str, encoding: str | None,
) -> None:
    """``httpx.MockTransport`` handlers answer ``httpx.Response(200, content=...)``, which httpx
    reads at construction. Before, such a stream failed (``StreamConsumed``) with nothing
    relayed; now its content is relayed and journaled, decoded, without the Content-Encoding
    it no longer has."""
    import gzip

    data = b"data: one\n\ndata: two\n\n"

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream", "x-up": "1"}
        if encoding:
            headers["content-encoding"] = encoding
            return httpx.Response(200, headers=headers, content=gzip.compress(data))
        return httpx.Response(200, headers=headers, content=data)

    cfg = Config(routes=(Route(prefix="/", upstream="http://up.invalid"),),
                 journal=JournalConfig(url=journal, flush_interval_ms=20))
    with trio.fail_after(20):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http, \
                open_proxy(cfg, client=http) as proxy:
            async with proxy.open_stream("GET", "/s") as h:
                body = b"".join([c async for c in h])
            assert await h.wait_finished() == "completed"
            assert await proxy.supervisor.writer.read_body(h.id) == data
            row = await proxy.supervisor.writer.get(h.id)
    assert body == data
    headers = dict(h.headers)
    assert headers[b"x-up"] == b"1" and b"content-encoding" not in headers
    assert row is not None and row["events"] == 2 and row["bytes"] == len(data)


@pytest.mark.parametrize(("version", "headers"), [
    ("2", []),  # HTTP/2: a body needs no Content-Length (DATA frames)
    ("1.1", []),  # no framing, yet a server that gives a body anyway: not dropped
    ("1.1", [(b"transfer-encoding", b"chunked")]),
    ("1.1", [(b"content-length", b"11")]),
])
async def test_the_app_reads_every_request_body_the_server_gives(
    version: str, headers: list[tuple[bytes, bytes]],
) -> None:
    """``proxy.app`` under another ASGI server: the body arrives in pieces and all of it goes
    upstream, whatever the framing headers say (an HTTP/1.x request without Content-Length or
    Transfer-Encoding has an empty body by its framing, and the app takes a shortcut for
    that one; a body it is given all the same still goes upstream)."""
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=b"data: ok\n\n")

    pieces = [{"type": "http.request", "body": b"hello ", "more_body": True},
              {"type": "http.request", "body": b"world", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            return pieces.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    cfg = Config(routes=(Route(prefix="/", upstream="http://up.invalid"),),
                 journal=JournalConfig(url="memory:"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": version,
             "method": "POST", "scheme": "http", "path": "/p", "raw_path": b"/p",
             "query_string": b"", "root_path": "", "headers": [(b"host", b"a"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    with trio.fail_after(10):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http, \
                open_proxy(cfg, client=http) as proxy:
            await proxy.app(scope, receive, send)
    assert bodies == [b"hello world"]
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"data: ok\n\n"
