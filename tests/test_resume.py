"""Resume, detached streams, many readers, explicit cancel, access and retention (issue 6)."""

from __future__ import annotations

import hashlib
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream._sse import Event, SSEParser
from keepstream.testing import FakeResponseSpec, FakeUpstream, chaos_request, run_keepstream

from .conftest import make_config


def _events(body: bytes) -> list[Event]:
    p = SSEParser()
    return [e for e in p.feed(body) if isinstance(e, Event)]


async def test_browser_reconnect_with_last_event_id(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """200 trials: lose the connection at a random event, reconnect with Last-Event-ID (while
    the stream is live, or after it completed): every event once, in order, nothing lost."""
    spec = FakeResponseSpec(events=20, interval=0.005, style="plain")
    want = [(e.event, e.data) for e in _events(spec.expected_body())]
    rng = random.Random("resume")
    cfg = make_config(fake_upstream.url, journal_url, resumable=True)
    trials = 200
    kinds = {"live": 0, "after": 0}
    with trio.fail_after(120):
        async with run_keepstream(cfg) as ks:

            async def trial(i: int) -> None:
                k = rng.randrange(1, 20)
                after_done = i % 2 == 1
                first = await chaos_request(ks.port, "GET", f"/chat/{i}", headers=spec.headers(),
                                            disconnect_after_events=k)
                got = _events(first.body)
                assert len(got) == k
                sid = first.header("keepstream-id")
                assert sid is not None
                assert got[-1].id == f"ks1.{sid.decode()}.{k}"
                if after_done:
                    await ks.wait_terminal(sid.decode())
                sent_at = time.time()
                again = await chaos_request(
                    ks.port, "GET", f"/chat/{i}",
                    headers=[*spec.headers(), ("Last-Event-ID", str(got[-1].id))])
                assert again.status == 200 and again.complete
                assert again.header("keepstream-id") == sid
                rest = _events(again.body)
                assert [(e.event, e.data) for e in got + rest] == want
                assert [e.id for e in rest] == [f"ks1.{sid.decode()}.{n}"
                                                 for n in range(k + 1, 21)]
                # Having everything, a further reconnect is told to stop (204).
                last = await chaos_request(ks.port, "GET", f"/chat/{i}",
                                           headers=[("Last-Event-ID", str(rest[-1].id))])
                assert last.status == 204
                # Was the stream still live when the reconnect was sent? (The record's
                # ``ended_at`` is wall-clock time too.)
                ended = (await ks.wait_terminal(sid.decode()))["ended_at"]
                assert isinstance(ended, str)
                ended_at = datetime.fromisoformat(ended).timestamp()  # ms, rounded down
                kinds["live" if ended_at > sent_at else "after"] += 1
                assert not (after_done and ended_at > sent_at)

            limiter = trio.CapacityLimiter(20)

            async def limited(i: int) -> None:
                async with limiter:
                    await trial(i)

            async with trio.open_nursery() as nursery:
                for i in range(trials):
                    nursery.start_soon(limited, i)
    # One upstream request per trial: reconnects never reached the upstream.
    assert len(fake_upstream.exchanges) == trials
    print(f"\nresume: {trials} trials, {kinds['live']} reconnects while the stream was live, "
          f"{kinds['after']} after it completed")
    # Both kinds really happened (the odd trials are all "after"; most even ones are live).
    assert kinds["after"] >= trials // 2 and kinds["live"] >= trials // 4, kinds


async def test_resume_unknown_or_foreign_route_is_404(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    cfg = make_config(fake_upstream.url, journal_url, resumable=True)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/x",
                                      headers=[("Last-Event-ID", "ks1.abcdef.3")])
            assert res.status == 404
    assert fake_upstream.exchanges == []


async def test_non_resumable_route_forwards_bytes_unchanged(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=5, style="plain")
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/x", headers=spec.headers())
            assert res.body == spec.expected_body()


async def test_detached_answers_at_once_and_body_endpoint_serves_live_and_after(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=20, interval=0.1, style="llm")  # about 2 s upstream
    expected = spec.expected_body()
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            t0 = trio.current_time()
            res = await chaos_request(ks.port, "POST", "/v1/chat", body=b"{}",
                                      headers=[*spec.headers(), ("Prefer", "respond-async")])
            took = trio.current_time() - t0
            print(f"\n202 after {took * 1000:.1f} ms")
            assert res.status == 202
            assert took < 0.5  # one sample: generous for a loaded CI machine
            # Answered before the upstream finished (often before it was even reached).
            assert not any(ex.done.is_set() for ex in fake_upstream.exchanges)
            import json

            rec = json.loads(res.body)
            sid = rec["id"]
            # The 50 ms figure, as the median of five more detached requests (each one's
            # upstream also takes about 2 s; each is cancelled once measured).
            times = []
            for _ in range(5):
                t1 = trio.current_time()
                other = await chaos_request(
                    ks.port, "POST", "/v1/chat", body=b"{}",
                    headers=[*spec.headers(), ("Prefer", "respond-async")])
                times.append(trio.current_time() - t1)
                assert other.status == 202
                other_id = json.loads(other.body)["id"]
                stop = await chaos_request(ks.port, "POST",
                                           f"/_keepstream/streams/{other_id}/cancel")
                assert stop.status == 200
            times.sort()
            print(f"202 median of 5 after {times[2] * 1000:.1f} ms (max {times[-1] * 1000:.1f})")
            assert times[2] < 0.05
            assert res.header("location") == f"/_keepstream/streams/{sid}".encode()
            assert rec["detached"] is True and rec["status"] == "open"
            still = await ks.record(sid)
            assert still is not None and still["status"] == "open"  # the read below is live
            live = await chaos_request(ks.port, "GET", f"/_keepstream/streams/{sid}/body")
            assert live.status == 200 and live.complete and live.body == expected
            final = await ks.wait_terminal(sid)
            assert final["status"] == "completed" and final["client_gone_at"] is None
            after = await chaos_request(ks.port, "GET", f"/_keepstream/streams/{sid}/body")
            assert after.body == expected
            part = await chaos_request(ks.port, "GET",
                                       f"/_keepstream/streams/{sid}/body?offset=100")
            assert part.body == expected[100:]
            ev = _events(expected)
            after5 = await chaos_request(ks.port, "GET",
                                         f"/_keepstream/streams/{sid}/body?after=5")
            assert _events(after5.body) == [
                Event(e.data, e.event, e.id, e.retry, e.end - ev[4].end) for e in ev[5:]]
            too_far = await chaos_request(
                ks.port, "GET", f"/_keepstream/streams/{sid}/body?offset={len(expected) + 1}")
            assert too_far.status == 416
            gone = await chaos_request(ks.port, "GET", f"/_keepstream/streams/{sid}/body",
                                       headers=[("Last-Event-ID", "no-such-upstream-id")])
            assert gone.status == 410


async def test_ten_readers_of_one_live_stream(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=300, event_size=1000, style="plain", interval=0.002)
    expected = spec.expected_body()
    server = ServerConfig(bind="127.0.0.1:0", stream_buffer_bytes=32 * 1024, drain_timeout=1)
    cfg = make_config(fake_upstream.url, journal_url, server=server)
    results: list[bytes] = []
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/big",
                                      headers=[*spec.headers(), ("Prefer", "respond-async")])
            sid = res.header("keepstream-id")
            assert sid is not None
            rec0 = await ks.record(sid.decode())
            assert rec0 is not None and rec0["status"] == "open"  # the readers join it live

            async def reader(i: int) -> None:
                slow = i < 2
                r = await chaos_request(
                    ks.port, "GET", f"/_keepstream/streams/{sid.decode()}/body",
                    read_delay=0.02 if slow else 0.0, read_size=4096 if slow else 65536,
                    recv_buffer=4096 if slow else None)
                assert r.complete
                results.append(r.body)

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(reader, i)
            rec = await ks.wait_terminal(sid.decode())
    assert rec["status"] == "completed"
    assert results == [expected] * 10
    assert len(fake_upstream.exchanges) == 1  # the upstream was read once


async def test_cancel_endpoint_stops_the_upstream(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=200, interval=0.02, style="plain")
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/c",
                                      headers=[*spec.headers(), ("Prefer", "respond-async")])
            sid = res.header("keepstream-id")
            assert sid is not None
            await trio.sleep(0.2)
            c = await chaos_request(ks.port, "POST",
                                    f"/_keepstream/streams/{sid.decode()}/cancel")
            assert c.status == 200 and b'"status":"cancelled"' in c.body
            ex = fake_upstream.exchanges[0]
            with trio.fail_after(2):
                await ex.done.wait()
            assert ex.peer_closed_first
            rec = await ks.wait_terminal(sid.decode())
            assert rec["status"] == "cancelled" and rec["reason"] == "cancel endpoint"
            assert spec.expected_body().startswith(await ks.body(sid.decode()))
            wrong = await chaos_request(ks.port, "GET",
                                        f"/_keepstream/streams/{sid.decode()}/cancel")
            assert wrong.status == 405


async def test_access_owner_or_admin_only(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    admin = "Bearer root-token"
    cfg = Config(
        routes=(Route(prefix="/", upstream=fake_upstream.url),),
        server=ServerConfig(bind="127.0.0.1:0", drain_timeout=1,
                            admin_token_sha256=hashlib.sha256(admin.encode()).hexdigest()),
        journal=JournalConfig(url=f"sqlite:///{tmp_path / 'j.db'}"),
    )
    spec = FakeResponseSpec(events=3, style="plain")
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/a",
                                      headers=[*spec.headers(),
                                               ("Authorization", "Bearer alice-secret")])
            sid = res.header("keepstream-id")
            assert sid is not None
            await ks.wait_terminal(sid.decode())
            url = f"/_keepstream/streams/{sid.decode()}"

            async def get(path: str, auth: str | None) -> Any:
                hdrs = [("Authorization", auth)] if auth else []
                return await chaos_request(ks.port, "GET", path, headers=hdrs)

            unknown = await get("/_keepstream/streams/0123456789abcdef", "Bearer bob")
            for auth in (None, "Bearer bob", "Bearer alice-secre"):
                for path in (url, url + "/body"):
                    r = await get(path, auth)
                    assert r.status == 404
                    assert r.body == unknown.body  # foreign looks exactly like unknown
            r = await chaos_request(ks.port, "POST", url + "/cancel",
                                    headers=[("Authorization", "Bearer bob")])
            assert r.status == 404
            assert (await get(url, "Bearer alice-secret")).status == 200
            assert (await get(url + "/body", "Bearer alice-secret")).body == spec.expected_body()
            assert (await get(url, admin)).status == 200
    files = [p for p in tmp_path.iterdir() if p.name.startswith("j.db")]  # noqa: ASYNC240
    raw = b"".join(p.read_bytes() for p in files)
    assert b"alice-secret" not in raw and b"root-token" not in raw


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_retention_prunes_old_records(
    fake_upstream: FakeUpstream, tmp_path: Path, kind: str
) -> None:
    url = f"sqlite:///{tmp_path / 'j.db'}" if kind == "sqlite" else "memory:"
    cfg = Config(routes=(Route(prefix="/", upstream=fake_upstream.url),),
                 server=ServerConfig(bind="127.0.0.1:0", drain_timeout=1),
                 journal=JournalConfig(url=url, retention=0.5))
    spec = FakeResponseSpec(events=2, style="plain")
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/r", headers=spec.headers())
            sid = res.header("keepstream-id")
            assert sid is not None
            await ks.wait_terminal(sid.decode())
            t0 = time.time()
            while await ks.record(sid.decode()) is not None:
                assert time.time() - t0 < 5, "retention never pruned the record"
                await trio.sleep(0.1)
            assert await ks.body(sid.decode()) == b""


async def test_resumable_event_over_the_caps_cuts_the_response_never_a_silent_gap(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """An upstream line over ``max_line_bytes`` on a resumable route: the client gets the
    events before it with their ids, then a comment saying why, then the response is cut (no
    clean end, so it is never taken for complete). The journal keeps every byte."""
    from keepstream._resume import OVERFLOW_NOTE

    spec = FakeResponseSpec(events=3, style="plain", huge_line=4096)
    server = ServerConfig(bind="127.0.0.1:0", drain_timeout=2.0, stop_grace=10.0,
                          max_line_bytes=1024)
    cfg = make_config(fake_upstream.url, journal_url, resumable=True, server=server)
    with trio.fail_after(20):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/huge", headers=spec.headers())
            sid = (res.header("keepstream-id") or b"").decode()
            rec = await ks.wait_terminal(sid)
            journaled = await ks.body(sid)
    assert res.status == 200 and not res.complete
    assert res.body.endswith(OVERFLOW_NOTE)
    assert res.body.count(b"id: ks1.") == 3
    assert rec["status"] == "completed" and journaled == spec.expected_body()
