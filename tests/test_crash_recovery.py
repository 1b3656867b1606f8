"""FAULTS row 11 (I1, I2, I5): SIGKILL at a random moment, then restart on the same journal.

Each cycle starts ``keepstream serve`` on one SQLite journal, opens a few paced streams (and one
that ends at once), SIGKILLs the process at U(0.1, 0.8) s and restarts it. After each restart:

* the killed run's open records are ``orphaned`` ("found open at start-up"), the finished one is
  still ``completed``;
* ``integrity_check()`` is empty (SQLite's own check, and every record's ``bytes`` column equals
  its stored chunks);
* J: each journaled body is a byte-exact prefix of what the upstream sent for that request;
* the loss (bytes the upstream had sent at the kill minus bytes journaled) is within the flush
  window documented in docs/operations.md: what the upstream sent in the last
  ``flush_interval_ms`` + 200 ms before the kill (the in-flight transaction, a thread hop and
  scheduling slack on a loaded 2-core box).

Two profiles: ``paced`` (``KEEPSTREAM_ROW11_CYCLES`` cycles, default 50; LLM-like streams of
~100 KB/s, where the timer flushes) and ``fast`` (``KEEPSTREAM_ROW11_FAST_CYCLES``, default 10;
several MB/s per stream, where ``flush_bytes`` triggers the flushes). Run with ``-s`` for the
figures; they are quoted in docs/operations.md.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from keepstream.testing import FakeResponseSpec, FakeUpstream, chaos_request

from .test_lifecycle import (
    Server,
    check_journal_against_upstream,
    exchange_for,
    open_journal,
    start_serve,
    write_config,
)

CYCLES = int(os.environ.get("KEEPSTREAM_ROW11_CYCLES", "50"))
FAST_CYCLES = int(os.environ.get("KEEPSTREAM_ROW11_FAST_CYCLES", "10"))
FLUSH_INTERVAL_MS = 50
FLUSH_BYTES = 256 * 1024
#: Slack on top of flush_interval_ms for the loss bound (commit in a thread, scheduling).
SLACK = 0.2
#: ~100 KB/s each, 3 s long: always open at the kill (LLM-like rates, the time bound applies).
PACED = FakeResponseSpec(events=300, event_size=1000, interval=0.01, style="plain")
#: Several MB/s each: flushes are triggered by flush_bytes, not only by the timer.
FAST = FakeResponseSpec(events=3000, event_size=8000, interval=0.001, style="plain")
#: Ends at once: terminal well before the kill.
QUICK = FakeResponseSpec(events=5, style="plain")
SAMPLE_EVERY = 0.005
PROFILES = {
    "paced": (CYCLES, [PACED, PACED, PACED, QUICK]),
    "fast": (FAST_CYCLES, [FAST, FAST, QUICK]),
}


@dataclass
class KilledRun:
    """One run that was SIGKILLed: what the upstream had sent and what the clients got."""

    paths: list[str] = field(default_factory=list)
    sent_at_kill: dict[str, int] = field(default_factory=dict)
    #: bytes the upstream sent in the window before the kill (the loss bound), per path
    bound: dict[str, int] = field(default_factory=dict)
    client_got: dict[str, int] = field(default_factory=dict)


@dataclass
class LossStats:
    losses: list[int] = field(default_factory=list)
    bounds: list[int] = field(default_factory=list)
    client_losses: list[int] = field(default_factory=list)
    cycle_client_losses: list[int] = field(default_factory=list)
    records: int = 0


async def run_and_kill(
    upstream: FakeUpstream, server: Server, cycle: int, streams: list[FakeResponseSpec],
    delay: float, window: float,
) -> KilledRun:
    """Start the streams, SIGKILL ``delay`` s after every one got its response head."""
    run = KilledRun()
    run.paths = [f"/c{cycle}/s{i}" if spec is not QUICK else f"/c{cycle}/quick"
                 for i, spec in enumerate(streams)]
    first = len(upstream.exchanges)
    history: list[tuple[float, list[int]]] = []
    killed = trio.Event()

    async def client(path: str, spec: FakeResponseSpec) -> None:
        res = await chaos_request(server.port, "GET", path, headers=spec.headers(), timeout=10)
        run.client_got[path] = len(res.body)

    def sample() -> list[int]:
        return [len(ex.body_sent) for ex in upstream.exchanges[first:]]

    async def sampler() -> None:
        while not killed.is_set():
            history.append((trio.current_time(), sample()))
            await trio.sleep(SAMPLE_EVERY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        for path, spec in zip(run.paths, streams, strict=True):
            nursery.start_soon(client, path, spec)
        await upstream.wait_exchanges(first + len(streams))
        while any(ex.headers_sent_at is None for ex in upstream.exchanges[first:]):
            await trio.sleep(0.002)
        await trio.sleep(delay)
        server.proc.kill()
        killed_at = trio.current_time()
        at_kill = sample()  # no checkpoint since the kill: the upstream sent nothing more
        killed.set()
        code = await server.proc.wait()
        # The clients see their connections end and return with what they got.
    assert code == -signal.SIGKILL
    assert set(run.client_got) == set(run.paths)
    # Bytes sent before the window began: the latest sample at or before its start (the bound
    # errs generous by at most one sampling interval).
    i = bisect_right([t for t, _ in history], killed_at - window) - 1
    before = history[i][1] if i >= 0 else []
    for k, ex in enumerate(upstream.exchanges[first:]):
        run.sent_at_kill[ex.request_target] = at_kill[k]
        run.bound[ex.request_target] = at_kill[k] - (before[k] if k < len(before) else 0)
    return run


def check_recovered(
    db: Path, upstream: FakeUpstream, run: KilledRun, streams: list[FakeResponseSpec],
    stats: LossStats,
) -> None:
    """After the restart: the killed run's records, integrity, J and the loss."""
    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        rows = [r for r in backend.list_records(None, 10_000) if r["path"] in run.paths]
        assert len(rows) == len(run.paths)
        check_journal_against_upstream(backend, upstream, rows)
    finally:
        backend.close()
    max_write = max(spec.event_size for spec in streams)
    cycle_loss = 0
    for row in rows:
        path = row["path"]
        client_loss = max(0, run.client_got[path] - row["bytes"])
        cycle_loss += client_loss
        if path.endswith("/quick"):
            assert row["status"] == "completed", row
            continue
        assert row["status"] == "orphaned", row
        assert row["reason"] == "found open at start-up"
        assert row["ended_at"] is not None
        # body_sent grows once a write returned: the write in flight at the kill may have
        # partly reached the journal (see check_journal_against_upstream).
        loss = run.sent_at_kill[path] - row["bytes"]
        assert -max_write <= loss <= run.bound[path], (path, loss, run.bound[path])
        stats.losses.append(max(0, loss))
        stats.bounds.append(run.bound[path])
        stats.client_losses.append(client_loss)
    # Keepstream-side hard cap, whatever the timing: the writer's backlog (4 x flush_bytes,
    # then upstream reads wait for the journal) plus one chunk.
    assert cycle_loss <= 4 * FLUSH_BYTES + 64 * 1024, cycle_loss
    stats.cycle_client_losses.append(cycle_loss)
    stats.records += len(rows)


@pytest.mark.parametrize("profile", list(PROFILES))
async def test_row11_sigkill_then_restart(
    fake_upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    cycles, streams = PROFILES[profile]
    rng = random.Random(f"row11-{profile}")
    toml, db = write_config(
        tmp_path, fake_upstream.url,
        extra_journal=f"flush_interval_ms = {FLUSH_INTERVAL_MS}\nflush_bytes = {FLUSH_BYTES}\n",
    )
    window = FLUSH_INTERVAL_MS / 1000 + SLACK
    stats = LossStats()
    with trio.fail_after(60 + 4 * cycles):
        server = await start_serve(toml)
        for cycle in range(cycles):
            run = await run_and_kill(fake_upstream, server, cycle, streams,
                                     rng.uniform(0.1, 0.8), window)
            server = await start_serve(toml)  # recovery has run once it listens
            check_recovered(db, fake_upstream, run, streams, stats)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.proc.wait() == 0

    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        rows = backend.list_records(None, 10_000)
        assert len(rows) == cycles * len(streams) == stats.records
        assert {r["status"] for r in rows} <= {"completed", "orphaned"}
        check_journal_against_upstream(backend, fake_upstream, rows)
        for row in rows:
            exchange_for(fake_upstream, row["path"])
    finally:
        backend.close()
    losses, bounds = stats.losses, stats.bounds
    assert len(losses) == cycles * (len(streams) - 1)
    ordered = sorted(losses)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    rate = statistics.median(bounds) / window / 1000
    print(
        f"\nrow 11 [{profile}]: {cycles} SIGKILL cycles (kill at U(0.1, 0.8) s), "
        f"{len(rows)} records, {len(losses)} orphaned, 0 integrity errors; "
        f"~{rate:.0f} KB/s per stream (flush_interval_ms={FLUSH_INTERVAL_MS}, "
        f"flush_bytes={FLUSH_BYTES})\n"
        f"  loss per orphaned record (upstream bytes sent at the kill - journaled): "
        f"median {statistics.median(ordered):.0f} B, p95 {p95} B, max {ordered[-1]} B\n"
        f"  bound (bytes sent in the last {window * 1000:.0f} ms before the kill): median "
        f"{statistics.median(bounds):.0f} B, max {max(bounds)} B; max loss/bound "
        f"{max(ls / b for ls, b in zip(losses, bounds, strict=True) if b):.2f}\n"
        f"  bytes forwarded to the client but not journaled: median "
        f"{statistics.median(stats.client_losses):.0f} B, max {max(stats.client_losses)} B "
        f"per record, max {max(stats.cycle_client_losses)} B per cycle (all streams)"
    )
