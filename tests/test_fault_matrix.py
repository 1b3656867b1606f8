"""FAULTS.md rows 1, 4, 5, 6, 7, 8, 9 and 18 against a real Hypercorn on loopback.

Every test asserts J: the journaled body is a byte-exact prefix of what the upstream sent (all
of it when ``completed``) and the record has exactly one terminal status.
"""

from __future__ import annotations

import os
import random
import statistics
from typing import Any

import pytest
import trio

from keepstream._sse import SSEParser
from keepstream.testing import (
    ChaosResult,
    FakeResponseSpec,
    FakeUpstream,
    RunningKeepstream,
    chaos_request,
    run_keepstream,
)

from .conftest import make_config

TERMINAL = {"completed", "cancelled", "upstream_error", "timeout", "interrupted", "orphaned"}


def _sid(res: ChaosResult) -> str:
    value = res.header("keepstream-id")
    assert value is not None, f"no Keepstream-Id in {res.status} {res.headers}"
    return value.decode()


def _exchange(upstream: FakeUpstream, res: ChaosResult) -> Any:
    idx = res.header("x-fake-exchange")
    assert idx is not None
    return upstream.exchanges[int(idx)]


async def _j(ks: RunningKeepstream, sid: str, sent: bytes) -> dict[str, Any]:
    """Wait for the terminal record and assert J against the bytes the upstream sent."""
    rec = await ks.wait_terminal(sid)
    assert rec["status"] in TERMINAL
    body = await ks.body(sid)
    if not sent.startswith(body):
        j = next((j for j in range(min(len(body), len(sent))) if body[j] != sent[j]), None)
        raise AssertionError(
            f"journal of {sid} is not a prefix of the upstream's bytes: {len(body)} vs "
            f"{len(sent)} bytes, first difference at {j}: {rec}"
        )
    assert rec["bytes"] == len(body)
    if rec["status"] == "completed":
        assert body == sent
    return rec


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _run_trials(n: int, concurrency: int, fn: Any) -> None:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await fn(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)


# -- row 1: client disconnect at a random byte ------------------------------------------------

ROW1_TRIALS = int(os.environ.get("KEEPSTREAM_ROW1_TRIALS", "200"))


@pytest.mark.parametrize("policy", ["finish", "cancel"])
async def test_row1_client_disconnect_at_random_byte(
    fake_upstream: FakeUpstream, journal_url: str, policy: str
) -> None:
    spec = FakeResponseSpec(events=20, interval=0.005, style="plain")
    expected = spec.expected_body()
    rng = random.Random(f"row1-{policy}")
    fds_before = _fd_count()
    latencies: list[float] = []
    statuses: list[str] = []
    cfg = make_config(fake_upstream.url, journal_url, on_disconnect=policy)
    with trio.fail_after(180):
        async with run_keepstream(cfg) as ks:

            async def trial(i: int) -> None:
                k = rng.randrange(0, len(expected))
                res = await chaos_request(
                    ks.port, "GET", f"/t/{i}", headers=spec.headers(),
                    disconnect_after_bytes=k, reset=(i % 4 == 0),
                )
                gone = trio.current_time()
                assert res.status == 200
                assert res.body == expected[:k]
                sid = _sid(res)
                ex = _exchange(fake_upstream, res)
                await ex.done.wait()
                assert ex.request_target == f"/t/{i}", (ex.request_target, i, ex.index)
                rec = await _j(ks, sid, bytes(ex.body_sent))
                statuses.append(str(rec["status"]))
                if policy == "finish":
                    assert rec["status"] == "completed", rec
                    assert bytes(ex.body_sent) == expected
                    # Left well before the upstream's end: the record must say the client left.
                    if ex.last_byte_at is not None and ex.last_byte_at > gone + 0.05:
                        assert rec["client_gone_at"] is not None
                else:
                    assert rec["status"] in ("cancelled", "completed"), rec
                    if rec["status"] == "cancelled":
                        assert rec["client_gone_at"] is not None
                        await ex.done.wait()
                        if not ex.finished_writing:
                            # The upstream was still sending: keepstream must have closed it.
                            assert ex.closed_at is not None and ex.peer_closed_first
                            latencies.append(ex.closed_at - gone)

            await _run_trials(ROW1_TRIALS, 20, trial)
            assert not ks.proxy.supervisor.live
        with trio.move_on_after(5):
            await fake_upstream.wait_connections_closed()
    assert len(statuses) == ROW1_TRIALS
    if policy == "cancel":
        # Most trials leave while the upstream is still sending; those must be cancelled.
        assert statuses.count("cancelled") > ROW1_TRIALS // 2
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\ncancel -> upstream closed: n={len(latencies)} p50={p50 * 1000:.1f} ms "
              f"p99={p99 * 1000:.1f} ms max={latencies[-1] * 1000:.1f} ms")
        # The target is 100 ms; the assertion is generous for a shared, noisy CI machine with
        # 20 concurrent trials in one process. The figure itself is reported above.
        assert p50 < 0.1
        assert latencies[-1] < 1.0
    assert _fd_count() <= fds_before + 4


async def test_cancel_closes_upstream_promptly(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    """I3: one stream at a time, the upstream sees its connection end soon after the client's."""
    spec = FakeResponseSpec(events=200, interval=0.01, style="llm")
    cfg = make_config(fake_upstream.url, journal_url, on_disconnect="cancel")
    latencies = []
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:
            for i in range(20):
                res = await chaos_request(ks.port, "GET", f"/c/{i}", headers=spec.headers(),
                                          disconnect_after_events=3 + i)
                gone = trio.current_time()
                ex = _exchange(fake_upstream, res)
                await ex.done.wait()
                assert ex.closed_at is not None and ex.peer_closed_first
                latencies.append(ex.closed_at - gone)
                rec = await _j(ks, _sid(res), bytes(ex.body_sent))
                assert rec["status"] == "cancelled"
    print(f"\ncancel latency max {max(latencies) * 1000:.2f} ms, "
          f"median {statistics.median(latencies) * 1000:.2f} ms")
    assert max(latencies) < 0.1


# -- row 4: upstream reset mid-stream ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["reset", "cut"])
async def test_row4_upstream_fails_mid_stream(
    fake_upstream: FakeUpstream, journal_url: str, mode: str
) -> None:
    full = FakeResponseSpec(events=30, style="plain").expected_body()
    rng = random.Random(f"row4-{mode}")
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(120):
        async with run_keepstream(cfg) as ks:

            async def trial(i: int) -> None:
                k = rng.randrange(1, len(full))
                if mode == "reset":
                    spec = FakeResponseSpec(events=30, style="plain", reset_after=k)
                else:
                    spec = FakeResponseSpec(events=30, style="plain", cut_after=k)
                res = await chaos_request(ks.port, "GET", f"/r/{i}", headers=spec.headers())
                assert res.status == 200
                assert not res.complete, "client saw a clean end of a failed stream"
                assert full[:k].startswith(res.body)
                rec = await _j(ks, _sid(res), full[:k])
                assert rec["status"] == "upstream_error", rec
                assert await ks.body(_sid(res)) == full[:k]

            await _run_trials(100, 10, trial)


async def test_row4_reset_through_fault_proxy(
    fake_upstream: FakeUpstream, journal_url: str, fault_proxy_factory: Any
) -> None:
    """limit_data on the upstream link: the journal has exactly what crossed it."""
    fp = await fault_proxy_factory(fake_upstream.port)
    fp.add_toxic("limit_data", stream="downstream", bytes=3000)
    spec = FakeResponseSpec(events=100, style="plain")
    cfg = make_config(fp.url, journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/x", headers=spec.headers())
            assert not res.complete
            sid = _sid(res)
            rec = await _j(ks, sid, spec.expected_body())
            assert rec["status"] == "upstream_error"
            body = await ks.body(sid)
            assert 0 < len(body) < 3000


# -- row 5: upstream stall mid-stream ---------------------------------------------------------


async def test_row5_idle_timeout_fires(fake_upstream: FakeUpstream, journal_url: str) -> None:
    spec = FakeResponseSpec(events=10, stall_after=3, style="plain")
    cfg = make_config(fake_upstream.url, journal_url, idle_timeout=1.0)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/s", headers=spec.headers())
            ended = trio.current_time()
            ex = _exchange(fake_upstream, res)
            rec = await _j(ks, _sid(res), bytes(ex.body_sent))
            assert rec["status"] == "timeout" and rec["reason"] == "idle_timeout"
            assert rec["events"] == 3
            assert not res.complete
            assert ex.last_byte_at is not None
            waited = ended - ex.last_byte_at
            assert 1.0 <= waited < 1.5, waited


async def test_row5_heartbeats_are_activity(fake_upstream: FakeUpstream, journal_url: str) -> None:
    spec = FakeResponseSpec(events=10, stall_after=3, heartbeat=0.3, style="plain")
    cfg = make_config(fake_upstream.url, journal_url, idle_timeout=0.6, total_timeout=2.5)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/h", headers=spec.headers())
            ex = _exchange(fake_upstream, res)
            rec = await _j(ks, _sid(res), bytes(ex.body_sent))
            # No false idle timeout: only the total deadline ends it.
            assert rec["status"] == "timeout" and rec["reason"] == "total_timeout", rec
            assert res.body.count(b": ping") >= 4


# -- row 6: upstream never answers headers ----------------------------------------------------


async def test_row6_upstream_never_answers(fake_upstream: FakeUpstream, journal_url: str) -> None:
    spec = FakeResponseSpec(never_answer=True)
    cfg = make_config(fake_upstream.url, journal_url, first_byte_timeout=0.5)
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:

            async def trial(i: int) -> None:
                t0 = trio.current_time()
                res = await chaos_request(ks.port, "GET", f"/n/{i}", headers=spec.headers())
                took = trio.current_time() - t0
                assert res.status == 504 and res.complete
                rec = await _j(ks, _sid(res), b"")
                assert rec["status"] == "timeout" and rec["reason"] == "first_byte_timeout"
                assert rec["bytes"] == 0 and rec["upstream_status"] is None
                assert 0.5 <= took < 1.0, took

            await _run_trials(100, 50, trial)


# -- row 7: upstream refuses ------------------------------------------------------------------


async def test_row7_upstream_refuses(journal_url: str) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    cfg = make_config(f"http://127.0.0.1:{port}", journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:

            async def trial(i: int) -> None:
                t0 = trio.current_time()
                res = await chaos_request(ks.port, "GET", f"/x/{i}")
                assert res.status == 502
                rec = await _j(ks, _sid(res), b"")
                assert rec["status"] == "upstream_error"
                assert trio.current_time() - t0 < 1.0

            await _run_trials(100, 20, trial)


# -- row 8: upstream 5xx with a body ----------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_row8_upstream_5xx_passes_through(
    fake_upstream: FakeUpstream, journal_url: str, status: int
) -> None:
    spec = FakeResponseSpec(events=4, style="plain", status=status, retry_after="7")
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            for i in range(34):
                res = await chaos_request(ks.port, "GET", f"/e/{i}", headers=spec.headers())
                assert res.status == status and res.complete
                assert res.header("retry-after") == b"7"
                assert res.body == spec.expected_body()
                rec = await _j(ks, _sid(res), spec.expected_body())
                assert rec["status"] == "completed" and rec["upstream_status"] == status


# -- row 9: malformed, split, oversized SSE ---------------------------------------------------


async def test_row9_malformed_sse_journaled_raw(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=50, style="plain", malformed=True)
    expected = spec.expected_body()
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/m", headers=spec.headers())
            assert res.body == expected and res.complete
            rec = await _j(ks, _sid(res), expected)
            assert rec["status"] == "completed"
            whole = SSEParser()
            whole.feed(expected)
            assert rec["events"] == whole.events


async def test_row9_huge_line_still_forwarded_and_journaled(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=2, style="plain", huge_line=10 * 1024 * 1024)
    expected = spec.expected_body()
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/big", headers=spec.headers())
            assert res.body == expected
            sid = _sid(res)
            rec = await _j(ks, sid, expected)
            assert rec["status"] == "completed" and rec["bytes"] == len(expected)
            # The oversized line stops parsing (no event counted past it), not forwarding or
            # journaling (both checked above).
            assert rec["events"] == spec.events, rec
            assert ks.proxy.supervisor.live == {}


async def test_row9_slicer_one_byte_reads(
    fake_upstream: FakeUpstream, journal_url: str, fault_proxy_factory: Any
) -> None:
    """Every split point: the upstream link delivers one byte per read."""
    fp = await fault_proxy_factory(fake_upstream.port)
    fp.add_toxic("slicer", stream="downstream", average_size=1, size_variation=0, delay=0)
    spec = FakeResponseSpec(events=6, style="plain", malformed=True)
    expected = spec.expected_body()
    cfg = make_config(fp.url, journal_url)
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:
            res = await chaos_request(ks.port, "GET", "/sl", headers=spec.headers())
            assert res.body == expected
            rec = await _j(ks, _sid(res), expected)
            whole = SSEParser()
            whole.feed(expected)
            assert rec["status"] == "completed" and rec["events"] == whole.events


# -- row 18: upstream slow close --------------------------------------------------------------


async def test_row18_completion_at_http_end_not_tcp_close(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    spec = FakeResponseSpec(events=5, style="plain", slow_close=2.0)
    cfg = make_config(fake_upstream.url, journal_url)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            t0 = trio.current_time()
            res = await chaos_request(ks.port, "GET", "/sc", headers=spec.headers())
            assert res.complete and res.body == spec.expected_body()
            rec = await _j(ks, _sid(res), spec.expected_body())
            assert rec["status"] == "completed"
            ex = _exchange(fake_upstream, res)
            assert ex.last_byte_at is not None
            took = trio.current_time() - ex.last_byte_at
            assert took < 0.1, f"completion waited {took:.3f} s for the TCP close"
            assert trio.current_time() - t0 < 1.5
