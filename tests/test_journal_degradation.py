"""FAULTS rows 12 and 13: the journal cannot write (disk full) or is locked by another
connection. keepstream must not crash nor block its event loop; while the journal cannot write,
new streams are refused 503 (fail closed) and readiness is 503; streams already running keep
their bytes in the bounded backlog and keep serving their clients; once the journal writes
again, every terminal record and every byte lands, and nothing committed before is lost.

Real SQLite file, real Hypercorn on loopback, the fake upstream. "Disk full" is SQLite's own
``PRAGMA max_page_count`` on keepstream's writer connection, set to the current page count (the
next page the journal needs fails with SQLITE_FULL), then raised again. The lock is a second
connection holding ``BEGIN EXCLUSIVE`` for 0.5, 5 and 30 s. Event-loop lag is measured by a 10 ms
ticker.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream._journal import SQLiteBackend
from keepstream.testing import FakeResponseSpec, FakeUpstream, RunningKeepstream, run_keepstream


def _config(upstream: str, db: Path) -> Config:
    return Config(
        routes=(Route(prefix="/", upstream=upstream),),
        server=ServerConfig(drain_timeout=2.0, stop_grace=10.0, persist_timeout=0.5),
        journal=JournalConfig(url=f"sqlite:///{db}", flush_interval_ms=20),
    )


class LagMeter:
    """How late a 10 ms sleep wakes up: the event loop's responsiveness."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            t = trio.current_time()
            await trio.sleep(0.01)
            self.lags.append(trio.current_time() - t - 0.01)

    def p99(self) -> float:
        lags = sorted(self.lags)
        return lags[int(len(lags) * 0.99)]


async def _writer_pragma(ks: RunningKeepstream, sql: str) -> None:
    """Run ``sql`` on keepstream's own writer connection, in the writer's thread slot."""
    writer = ks.proxy.supervisor.writer
    backend = writer.backend
    assert isinstance(backend, SQLiteBackend)
    conn = backend._writer
    await trio.to_thread.run_sync(conn.execute, sql, limiter=writer._w_limiter)


def _rows(db: Path) -> dict[str, dict[str, object]]:
    backend = SQLiteBackend(str(db))
    backend.setup()
    try:
        return {str(r["id"]): r for r in backend.list_records(None, 10_000)}
    finally:
        backend.close()


def _body(db: Path, sid: str) -> bytes:
    backend = SQLiteBackend(str(db))
    backend.setup()
    try:
        return backend.read_body(sid)
    finally:
        backend.close()


async def _stream_to_end(client: httpx.AsyncClient, path: str, spec: FakeResponseSpec,
                         out: dict[str, object]) -> None:
    async with client.stream("GET", path, headers=spec.headers()) as resp:
        out["id"] = resp.headers["keepstream-id"]
        out["status"] = resp.status_code
        out["body"] = b"".join([c async for c in resp.aiter_raw()])


async def test_row12_journal_full_fails_closed_and_recovers(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    spec = FakeResponseSpec(events=60, interval=0.05, style="plain")
    quick = FakeResponseSpec(events=2, style="plain")
    lag = LagMeter()
    live: dict[str, object] = {}
    with trio.fail_after(60):
        async with run_keepstream(_config(fake_upstream.url, db)) as ks, \
                httpx.AsyncClient(base_url=ks.url, trust_env=False, timeout=10) as client, \
                trio.open_nursery() as nursery:
            nursery.start_soon(lag.run)
            # Something committed before the fault: it must survive.
            before = await client.get("/before", headers=quick.headers())
            assert before.status_code == 200
            done = trio.Event()

            async def live_stream() -> None:
                await _stream_to_end(client, "/live", spec, live)
                done.set()

            nursery.start_soon(live_stream)
            await fake_upstream.wait_exchanges(2)
            await trio.sleep(0.2)
            pages = ks.proxy.supervisor.writer.backend
            assert isinstance(pages, SQLiteBackend)
            count = await trio.to_thread.run_sync(
                lambda: pages._writer.execute("PRAGMA page_count").fetchone()[0])
            writer = ks.proxy.supervisor.writer
            failed_at: list[float] = []

            async def first_failure() -> None:
                while writer.failures == 0:
                    await trio.sleep(0.005)
                failed_at.append(trio.current_time())

            nursery.start_soon(first_failure)
            fault_at = trio.current_time()
            await _writer_pragma(ks, f"PRAGMA max_page_count = {count}")
            refused_after = None
            statuses = []
            while refused_after is None:
                resp = await client.get("/probe", headers=quick.headers())
                statuses.append(resp.status_code)
                if resp.status_code == 503:
                    # From the first failed journal write (the pages left in the file may
                    # take a few more writes before SQLite runs out).
                    assert writer.failures > 0, "503 before any journal write failed"
                    # first_failure polls every 5 ms: a failure in the flush loop just
                    # before this probe can be answered 503 before that poll sees it.
                    first = failed_at[0] if failed_at else trio.current_time()
                    failed_at[:] = [first]
                    refused_after = trio.current_time() - first
                    assert resp.headers["retry-after"] == "1"
                    assert "journal" in resp.json()["error"]
                else:
                    await trio.sleep(0.05)
                assert trio.current_time() - fault_at < 5
            ready = await client.get("/_keepstream/readyz")
            assert ready.status_code == 503
            assert ks.proxy.supervisor.writer.degraded
            # The live stream goes on for its client while its bytes wait in the backlog.
            await done.wait()
            assert live["status"] == 200 and live["body"] == spec.expected_body()
            sid = str(live["id"])
            assert _rows(db)[sid]["status"] == "open"  # its terminal write has not landed
            await _writer_pragma(ks, "PRAGMA max_page_count = 1073741823")
            with trio.fail_after(10):
                while ks.proxy.supervisor.writer.degraded or \
                        _rows(db)[sid]["status"] == "open":
                    await trio.sleep(0.05)
            after = await client.get("/after", headers=quick.headers())
            assert after.status_code == 200 and after.content == quick.expected_body()
            nursery.cancel_scope.cancel()
    rows = _rows(db)
    assert rows[sid]["status"] == "completed" and _body(db, sid) == spec.expected_body()
    assert rows[before.headers["keepstream-id"]]["status"] == "completed"
    assert all(r["status"] != "open" for r in rows.values()), rows
    print(f"\nrow 12: 503 {refused_after * 1000:.0f} ms after the first failed journal write "
          f"({(failed_at[0] - fault_at) * 1000:.0f} ms after the fault) "
          f"(probes: {statuses}); event-loop lag p99 {lag.p99() * 1000:.1f} ms, "
          f"max {max(lag.lags) * 1000:.1f} ms; {len(rows)} records, none open")
    assert refused_after < 1.0
    assert lag.p99() < 0.05


@pytest.mark.parametrize("hold", [0.5, 5.0, 30.0])
async def test_row13_journal_locked(
    fake_upstream: FakeUpstream, tmp_path: Path, hold: float
) -> None:
    db = tmp_path / "j.db"
    spec = FakeResponseSpec(events=40, interval=0.05, style="plain")
    quick = FakeResponseSpec(events=2, style="plain")
    lag = LagMeter()
    results: list[dict[str, object]] = []
    with trio.fail_after(90):
        async with run_keepstream(_config(fake_upstream.url, db)) as ks, \
                httpx.AsyncClient(base_url=ks.url, trust_env=False, timeout=20) as client, \
                trio.open_nursery() as nursery:
            nursery.start_soon(lag.run)
            committed = []
            for i in range(5):
                resp = await client.get(f"/c{i}", headers=quick.headers())
                assert resp.status_code == 200
                committed.append(resp.headers["keepstream-id"])
            for i in range(3):
                out: dict[str, object] = {}
                results.append(out)
                nursery.start_soon(_stream_to_end, client, f"/live{i}", spec, out)
            await fake_upstream.wait_exchanges(8)
            locker = sqlite3.connect(db, isolation_level=None, timeout=5,
                                     check_same_thread=False)
            await trio.to_thread.run_sync(locker.execute, "BEGIN EXCLUSIVE")
            probes = []
            try:
                end = trio.current_time() + hold
                while trio.current_time() < end:
                    resp = await client.get("/probe", headers=quick.headers())
                    probes.append(resp.status_code)
                    await trio.sleep(0.1)
            finally:
                await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
                locker.close()
            with trio.fail_after(20):
                while len([r for r in results if "body" in r]) < 3 or \
                        ks.proxy.supervisor.live or ks.proxy.supervisor.writer.degraded:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    rows = _rows(db)
    for sid in committed:
        assert rows[sid]["status"] == "completed"
        assert _body(db, sid) == quick.expected_body()
    for out in results:
        assert out["status"] == 200 and out["body"] == spec.expected_body()
        sid = str(out["id"])
        assert rows[sid]["status"] == "completed" and _body(db, sid) == spec.expected_body()
    assert all(r["status"] != "open" for r in rows.values())
    assert set(probes) <= {200, 503}, probes
    print(f"\nrow 13 (locked {hold:g} s): probes {probes.count(200)} x 200, "
          f"{probes.count(503)} x 503; event-loop lag p99 {lag.p99() * 1000:.1f} ms, max "
          f"{max(lag.lags) * 1000:.1f} ms; {len(rows)} records, 0 committed rows lost")
    assert lag.p99() < 0.05
