"""FAULTS rows 2 and 3: half-closing clients, slow and stalled readers (I8)."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest
import trio

from keepstream import ServerConfig
from keepstream._journal import SQLiteBackend
from keepstream.testing import (
    FakeResponseSpec,
    FakeUpstream,
    chaos_request,
    run_keepstream,
    run_keepstream_process,
)

from .conftest import make_config


def _epoch(rfc3339: object) -> float:
    assert isinstance(rfc3339, str)
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_row3_stalled_reader_is_dropped_and_journal_keeps_up(
    fake_upstream: FakeUpstream, journal_url: str
) -> None:
    cap = 64 * 1024
    server = ServerConfig(bind="127.0.0.1:0", client_stall_timeout=1.0,
                          stream_buffer_bytes=cap, drain_timeout=1.0)
    cfg = make_config(fake_upstream.url, journal_url, server=server)
    spec = FakeResponseSpec(events=1500, event_size=1000, style="plain", interval=0.004)
    peak = 0
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks, trio.open_nursery() as nursery:

            async def watch_buffers() -> None:
                nonlocal peak
                while True:
                    for s in ks.proxy.supervisor.live.values():
                        peak = max(peak, s.end - s.base)
                    await trio.sleep(0.005)

            nursery.start_soon(watch_buffers)
            started = time.time()
            res = await chaos_request(ks.port, "GET", "/s", headers=spec.headers(),
                                      stall_after_bytes=10_000, recv_buffer=4096, hold=4)
            assert res.body == spec.expected_body()[:10_000]
            sid = res.header("keepstream-id")
            assert sid is not None
            rec = await ks.wait_terminal(sid.decode())
            nursery.cancel_scope.cancel()
    # The client stalled within ~50 ms of the start; it is dropped after client_stall_timeout
    # (not before: the stall began after ``started``), within the +1 s of issue 3.
    assert rec["client_gone_at"] is not None
    dropped_after = _epoch(rec["client_gone_at"]) - started
    print(f"\nrow 3 stalled reader: dropped {dropped_after:.3f} s after the request "
          f"(client_stall_timeout 1 s); peak live buffer {peak} B (cap {cap} B)")
    assert 1.0 - 0.01 <= dropped_after < 1.0 + 1.0, dropped_after
    # Journal kept up with the upstream, not the client (finish policy: full body).
    assert rec["status"] == "completed"
    assert rec["bytes"] == len(spec.expected_body())
    # Bounded buffer: the cap plus at most what the journal had not yet made durable.
    assert peak <= cap + 256 * 1024, peak


async def test_row3_fifty_slow_readers_bounded_memory(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """keepstream's own RSS (a separate process) stays under cap x streams + 20 MiB."""
    cap = 64 * 1024
    db = tmp_path / "ks.db"
    cfg = make_config(fake_upstream.url, f"sqlite:///{db}",
                      server=ServerConfig(stream_buffer_bytes=cap, drain_timeout=1.0))
    spec = FakeResponseSpec(events=400, event_size=1000, style="plain")
    expected = spec.expected_body()
    ok: list[bool] = []
    async with run_keepstream_process(cfg, workdir=tmp_path) as ks:
        status = Path(f"/proc/{ks.proc.pid}/status")

        def rss_kib() -> int:
            for row in status.read_text().splitlines():
                if row.startswith("VmRSS:"):
                    return int(row.split()[1])
            raise AssertionError("no VmRSS")

        # Warm up (imports, first connections) before the baseline.
        await chaos_request(ks.port, "GET", "/warm", headers=spec.headers())
        rss_before = peak = rss_kib()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:

                async def reader(i: int) -> None:
                    res = await chaos_request(ks.port, "GET", f"/slow/{i}",
                                              headers=spec.headers(), read_delay=0.01,
                                              read_size=8192, recv_buffer=8192)
                    ok.append(res.complete and res.body == expected)

                for i in range(50):
                    nursery.start_soon(reader, i)
                while len(ok) < 50:
                    peak = max(peak, rss_kib())
                    await trio.sleep(0.02)
    assert ks.returncode == 0, ks.stderr()
    assert ok == [True] * 50
    b = SQLiteBackend(str(db))
    b.setup()
    try:
        rows = [r for r in b.list_records(None, 100) if r["path"].startswith("/slow/")]
        assert len(rows) == 50
        for row in rows:
            assert row["status"] == "completed"
            assert b.read_body(row["id"]) == expected
    finally:
        b.close()
    growth_kib = peak - rss_before
    print(f"\n50 slow readers: keepstream RSS growth {growth_kib} KiB "
          f"(bound {(cap * 50 + 20 * 1024 * 1024) // 1024} KiB)")
    assert growth_kib < (cap * 50 + 20 * 1024 * 1024) // 1024


@pytest.mark.parametrize(("policy", "status"), [("finish", "completed"),
                                                ("cancel", "cancelled")])
async def test_row2_half_close_is_a_disconnect(
    fake_upstream: FakeUpstream, journal_url: str, policy: str, status: str
) -> None:
    """Documented outcome: Hypercorn reports a client's SHUT_WR as ``http.disconnect`` before
    any response is sent, so keepstream treats a half-close as the client leaving: the stream
    follows the route's disconnect policy, and the client gets no response."""
    spec = FakeResponseSpec(events=5, interval=0.05, style="plain")
    cfg = make_config(fake_upstream.url, journal_url, on_disconnect=policy)
    outcomes = set()
    with trio.fail_after(60):
        async with run_keepstream(cfg) as ks:
            for i in range(20):
                res = await chaos_request(ks.port, "GET", f"/hc/{i}", headers=spec.headers(),
                                          half_close=True)
                assert res.status is None  # no response: the connection was closed
                await ks.wait_all_terminal()
            rows = await ks.proxy.supervisor.writer.list_records(None, 100)
            for row in rows:
                outcomes.add(row["status"])
                assert row["client_gone_at"] is not None
                body = await ks.body(row["id"])
                assert spec.expected_body().startswith(body)
                if row["status"] == "completed":
                    assert body == spec.expected_body()
            assert len(rows) == 20
    assert outcomes == {status}


async def test_sigterm_with_stalled_clients_exits_on_time(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Defaults (``client_stall_timeout`` 30 s > ``stop_grace`` 10 s) with ``drain_timeout`` 1:
    the clients stay stalled through the drain; the process still exits 0 before stop_grace."""
    db = tmp_path / "ks.db"
    cfg = make_config(fake_upstream.url, f"sqlite:///{db}",
                      server=ServerConfig(drain_timeout=1.0))
    spec = FakeResponseSpec(events=3000, event_size=1000, style="plain", interval=0.002)
    async with run_keepstream_process(cfg, workdir=tmp_path) as ks:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(partial(
                        chaos_request, ks.port, "GET", f"/st/{i}", headers=spec.headers(),
                        stall_after_bytes=5000, recv_buffer=4096, hold=12))
                await fake_upstream.wait_exchanges(5)
                await trio.sleep(1.0)
                t0 = trio.current_time()
                ks.send_signal(signal.SIGTERM)
                code = await ks.wait()
                took = trio.current_time() - t0
                nursery.cancel_scope.cancel()
    print(f"\nSIGTERM with 5 stalled clients: exit {code} after {took:.3f} s (stop_grace 10 s)")
    assert code == 0, ks.stderr()
    # drain_timeout 1 + persist 1 + margin, then the hard-exit fallback: well inside 10 s.
    assert took < 10.0, took
    b = SQLiteBackend(str(db))
    b.setup()
    try:
        rows = b.list_records(None, 100)
    finally:
        b.close()
    assert len(rows) == 5
    assert {r["status"] for r in rows} <= {"interrupted", "completed"}
