"""The examples in ``examples/`` run as tests: real Hypercorn on 127.0.0.1 port 0, the real fake
upstream of ``keepstream.testing``, and byte-exact checks of what the journal kept.

Each example is driven through its importable async function; each ``main()`` also runs as a
subprocess, standalone (it starts its own fake upstream), and must exit 0 on SIGINT.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from examples import embed_mount, embed_serve, embed_transform

from keepstream._journal import open_backend
from keepstream.testing import ChaosResult, FakeResponseSpec, FakeUpstream, chaos_request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(params=["sqlite", "memory"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/j.db" if request.param == "sqlite" else "memory:"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _tokens(spec: FakeResponseSpec) -> str:
    """The LLM content of an ``llm``-style spec, parsed independently of the example."""
    out: list[str] = []
    for part in spec.expected_parts():
        assert part.startswith(b"data: ") and part.endswith(b"\n\n")
        data = part[len(b"data: "):-2]
        if data != b"[DONE]":
            out.append(json.loads(data)["choices"][0]["delta"]["content"])
    return "".join(out)


async def _get(port: int, target: str) -> ChaosResult:
    res = await chaos_request(port, "GET", target, timeout=10)
    assert res.error is None, res.error
    return res


async def _record(port: int, root: str, sid: str) -> dict[str, Any]:
    """The journaled body first (it ends once the stream ends), then the terminal record."""
    res = await _get(port, f"{root}/_keepstream/streams/{sid}")
    assert res.status == 200, res.body
    record: dict[str, Any] = json.loads(res.body)
    return record


async def _journaled_body(port: int, root: str, sid: str) -> bytes:
    """``GET .../body``: the journal, then the live tail until the stream ends."""
    res = await _get(port, f"{root}/_keepstream/streams/{sid}/body")
    assert res.status == 200 and res.complete
    return res.body


def _sid(res: ChaosResult) -> str:
    value = res.header("keepstream-id")
    assert value is not None, res.headers
    return value.decode()


# -- example 1: a service transforming a stream opened with proxy.open_stream ----------------


async def test_transform_uppercases_tokens_and_journals_raw_body(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    spec = FakeResponseSpec(events=12, event_size=90, interval=0.01, seed=7)
    request_body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_transform.run_shout_service, fake_upstream.url, port=0,
                journal_url=journal, shutdown_trigger=stop.wait))
            port = _port(url)
            res = await chaos_request(
                port, "POST", "/shout", body=request_body, timeout=10,
                headers=[*spec.headers(), ("Content-Type", "application/json")])
            assert res.status == 200 and res.complete, res
            assert res.body == _tokens(spec).upper().encode()
            assert res.body != _tokens(spec).encode()
            sid = _sid(res)
            assert await _journaled_body(port, "", sid) == spec.expected_body()
            record = await _record(port, "", sid)
            stop.set()  # the service drains, Hypercorn stops, run_shout_service returns
    assert record["status"] == "completed"
    assert record["bytes"] == len(spec.expected_body())
    assert record["client_gone_at"] is None
    assert record["path"] == embed_transform.UPSTREAM_PATH
    (ex,) = fake_upstream.exchanges
    assert (ex.request_method, ex.request_target) == ("POST", "/v1/chat/completions")
    assert ex.request_body == request_body
    assert ex.header("x-fake-seed") == "7"


async def test_transform_client_leaving_keeps_the_fetch(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    spec = FakeResponseSpec(events=30, event_size=80, interval=0.02)
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_transform.run_shout_service, fake_upstream.url, port=0,
                journal_url=journal, shutdown_trigger=stop.wait))
            port = _port(url)
            res = await chaos_request(port, "POST", "/shout", headers=spec.headers(),
                                      disconnect_after_bytes=5, timeout=10)
            assert res.status == 200 and not res.complete
            sid = _sid(res)
            # The handler left open_stream early: "finish" keeps fetching into the journal.
            assert await _journaled_body(port, "", sid) == spec.expected_body()
            record = await _record(port, "", sid)
            stop.set()
    assert record["status"] == "completed"
    assert record["client_gone_at"] is not None
    assert fake_upstream.exchanges[0].finished_writing


async def test_transform_upstream_reset_is_not_a_clean_end(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    spec = FakeResponseSpec(events=10, event_size=100, reset_after=450)
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_transform.run_shout_service, fake_upstream.url, port=0,
                journal_url=journal, shutdown_trigger=stop.wait))
            port = _port(url)
            res = await chaos_request(port, "POST", "/shout", headers=spec.headers(), timeout=10)
            assert res.status == 200
            assert not res.complete  # truncated, never a fake clean end
            sid = _sid(res)
            assert await _journaled_body(port, "", sid) == spec.expected_body()[:450]
            record = await _record(port, "", sid)
            stop.set()
    assert record["status"] == "upstream_error"


def test_token_decoder_any_chunking() -> None:
    spec = FakeResponseSpec(events=6, event_size=70, seed=1)
    raw = spec.expected_body().replace(b"\n", b"\r\n")
    for size in (1, 2, 3, 7, 64, len(raw)):
        decoder = embed_transform.TokenDecoder()
        tokens = [t for i in range(0, len(raw), size) for t in decoder.feed(raw[i:i + size])]
        assert "".join(tokens) == _tokens(spec)


# -- example 2: proxy.app mounted under /llm/ ------------------------------------------------


async def test_mount_proxies_under_llm_byte_exact(fake_upstream: FakeUpstream,
                                                  journal: str) -> None:
    spec = FakeResponseSpec(events=10, event_size=120, interval=0.01, seed=11)
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_mount.run_mounted, fake_upstream.url, port=0, journal_url=journal,
                shutdown_trigger=stop.wait))
            port = _port(url)
            res = await chaos_request(port, "GET", "/llm/v1/chat/completions?user=a",
                                      headers=spec.headers(), timeout=10)
            assert res.status == 200 and res.complete, res
            assert res.body == spec.expected_body()
            sid = _sid(res)
            assert await _journaled_body(port, "/llm", sid) == spec.expected_body()
            record = await _record(port, "/llm", sid)
            # The outer app's own routes, and paths it does not hand to keepstream.
            home = await _get(port, "/")
            other = await _get(port, "/v1/chat/completions")
            unrouted = await _get(port, "/llm/elsewhere")
            healthz = await _get(port, "/llm/_keepstream/healthz")
            stop.set()
    assert record["status"] == "completed" and record["path"] == "/v1/chat/completions"
    assert record["bytes"] == len(spec.expected_body())
    (ex,) = fake_upstream.exchanges  # only the one proxied request reached the upstream
    assert ex.request_target == "/v1/chat/completions?user=a"
    assert home.status == 200 and b"/llm/" in home.body
    assert other.status == 404
    assert unrouted.status == 404
    assert healthz.status == 200


async def test_mount_dispatcher_stripping_the_prefix_also_works(
    fake_upstream: FakeUpstream, journal: str
) -> None:
    """A dispatcher that strips ``/llm`` from ``path`` itself (older ASGI style) routes the same."""
    from keepstream import Config, JournalConfig, Route, open_proxy

    cfg = Config(routes=(Route(prefix="/v1/", upstream=fake_upstream.url + "/v1/"),),
                 journal=JournalConfig(url=journal))
    sent: list[dict[str, Any]] = []

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await trio.sleep_forever()  # the client stays until the response ends

    async def send(message: Any) -> None:
        sent.append(dict(message))

    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            await proxy.app({"type": "http", "method": "GET", "path": "/v1/x",
                             "raw_path": b"/v1/x", "root_path": "/llm", "query_string": b"",
                             "headers": []}, receive, send)
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == FakeResponseSpec().expected_body()
    assert fake_upstream.exchanges[0].request_target == "/v1/x"


async def test_mount_respond_async_location_includes_root_path(
    fake_upstream: FakeUpstream,
) -> None:
    """Under a mount, ``Location`` must carry the ``root_path``."""
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_mount.run_mounted, fake_upstream.url, port=0, shutdown_trigger=stop.wait))
            port = _port(url)
            res = await chaos_request(port, "GET", "/llm/v1/x", timeout=10,
                                      headers=[("Prefer", "respond-async")])
            assert res.status == 202
            location = res.header("location")
            assert location == f"/llm/_keepstream/streams/{_sid(res)}".encode()
            followed = await _get(port, location.decode())
            stop.set()
    assert followed.status == 200


# -- example 3: keepstream.serve beside the program's own tasks ------------------------------


async def test_serve_beside_own_tasks_drains_then_stops(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    journal = f"sqlite:///{tmp_path}/j.db"
    spec = FakeResponseSpec(events=20, event_size=80, interval=0.03)
    stop = trio.Event()
    lines: list[str] = []
    result: dict[str, ChaosResult] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_serve.run_program, fake_upstream.url, journal_url=journal,
                shutdown_trigger=stop.wait, report_interval=0.05, log=lines.append))
            port = _port(url)

            async def client() -> None:
                result["r"] = await chaos_request(port, "GET", "/v1/chat",
                                                  headers=spec.headers(), timeout=10)

            nursery.start_soon(client)
            await fake_upstream.wait_exchanges(1)
            stop.set()  # mid-stream: keepstream drains, the stream may finish
        # Leaving the nursery means run_program returned: every task of it has ended.
    res = result["r"]
    assert res.status == 200 and res.complete
    assert res.body == spec.expected_body()
    assert lines[0] == f"embed_serve: listening on {url}"
    assert any(line.startswith("reporter: live=") for line in lines)
    assert lines[-2:] == ["keepstream: drained and stopped", "embed_serve: all tasks ended"]
    backend = open_backend(journal)
    backend.setup()
    try:
        sid = _sid(res)
        row = backend.get(sid)
        assert row is not None and row["status"] == "completed"
        assert backend.read_body(sid) == spec.expected_body()
    finally:
        backend.close()


async def test_serve_cancelled_from_outside_persists(fake_upstream: FakeUpstream,
                                                     tmp_path: Path) -> None:
    journal = f"sqlite:///{tmp_path}/j.db"
    spec = FakeResponseSpec(events=200, event_size=80, interval=0.05)
    result: dict[str, ChaosResult] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                embed_serve.run_program, fake_upstream.url, journal_url=journal,
                drain_timeout=0.3, log=lambda line: None))

            async def client() -> None:
                result["r"] = await chaos_request(_port(url), "GET", "/v1/chat",
                                                  headers=spec.headers(), timeout=10)

            nursery.start_soon(client)
            await fake_upstream.wait_exchanges(1)
            await trio.sleep(0.2)
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()  # from outside: no shutdown_trigger, no signal
        elapsed = trio.current_time() - t0
    assert elapsed < 0.3 + 1.0 + 1.5  # drain_timeout + persist_timeout + margin
    backend = open_backend(journal)
    backend.setup()
    try:
        (row,) = backend.list_records(None, 10)
        assert row["status"] == "interrupted"
        body = backend.read_body(row["id"])
        assert 0 < len(body) < len(spec.expected_body())
        assert spec.expected_body().startswith(body)
    finally:
        backend.close()


# -- every main(): standalone, stops cleanly on SIGINT ---------------------------------------


@pytest.mark.parametrize(("script", "args", "method", "target", "transformed"), [
    ("embed_transform.py", ["--port", "0"], "POST", "/shout", True),
    ("embed_mount.py", ["--port", "0"], "GET", "/llm/v1/chat/completions", False),
    ("embed_serve.py", ["--bind", "127.0.0.1:0"], "GET", "/v1/chat/completions", False),
])
async def test_main_runs_standalone_and_exits_0_on_sigint(
    tmp_path: Path, script: str, args: list[str], method: str, target: str, transformed: bool
) -> None:
    spec = FakeResponseSpec(events=4, event_size=60)
    cmd = [sys.executable, str(EXAMPLES / script), *args, "--journal", "memory:"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(partial(
                trio.run_process, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                check=False, cwd=tmp_path))
            assert proc.stdout is not None
            out = b""
            while (m := re.search(rb"listening on http://127\.0\.0\.1:(\d+)", out)) is None:
                data = await proc.stdout.receive_some()
                assert data, out.decode(errors="replace")
                out += data
            res = await chaos_request(int(m.group(1)), method, target, headers=spec.headers(),
                                      timeout=10)
            assert res.status == 200 and res.complete, out
            want = _tokens(spec).upper().encode() if transformed else spec.expected_body()
            assert res.body == want
            proc.send_signal(signal.SIGINT)
            while data := await proc.stdout.receive_some():
                out += data
            assert await proc.wait() == 0, out.decode(errors="replace")
