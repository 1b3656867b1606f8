"""The performance suite keeps working: ``benchmarks/run.py --smoke`` runs every peer (no proxy
at all, keepstream with the SQLite journal and with none, the minimal relay, and the aiohttp
and Starlette relays and nginx when installed) through every scenario on tiny counts, and
fails if any event is lost or corrupted; its drain scenario (SIGTERM with 20 live streams)
fails if a record is left open, is not byte-exact, or is missing. No timing is asserted here
(timing claims live in the benchmarks themselves, docs/performance.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_forwards_every_event() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every peer forwarded every event intact" in proc.stdout
    assert "smoke drain: every record terminal and byte-exact" in proc.stdout
    for peer in ("direct", "keepstream-sqlite", "keepstream-none", "minimal"):
        assert peer in proc.stdout
    for scenario in ("bulk", "paced", "idle", "ttfb", "drain"):
        assert f"  {scenario} " in proc.stdout
    assert "added latency over direct, paced" in proc.stdout
    if shutil.which("nginx") is not None:  # the nginx peer ran every load scenario
        for scenario in ("bulk", "paced", "idle", "ttfb"):
            assert f"  {scenario:6} #1 nginx " in proc.stdout
    else:
        assert "note: peer nginx skipped: nginx not installed" in proc.stdout


def test_wakeup_floor_runs_every_mode() -> None:
    """``benchmarks/wakeup_floor.py`` (the floor behind the upstream poller) on tiny counts:
    each way of waiting reads the writer's messages and reports a figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wakeup_floor.py"), "--sockets", "4",
         "--rate", "20", "--seconds", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"trio-tasks", "trio-poller", "asyncio"}
    for count, per in rows.values():
        assert 0 < int(count) <= 4 * 20 * 0.5 + 4  # what the writer sent, at most
        assert float(per) > 0


def test_journal_floor_runs_every_mode() -> None:
    """``benchmarks/journal_floor.py`` (the journal's share of a paced event) on tiny counts:
    every mode writes every event (the script checks each body and row and exits non-zero
    otherwise) and reports a figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "journal_floor.py"), "--streams", "10",
         "--flushes", "30", "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"keepstream", "chunks-only", "progress-rows"}
    for events, per_event, per_flush, _checkpoints, _ratio in rows.values():
        assert int(events) == 10 * 30 * 2.5
        assert float(per_event) > 0 and float(per_flush) > float(per_event)


def test_commit_floor_runs_every_mode() -> None:
    """``benchmarks/commit_floor.py`` (a short stream's two durable commits) on tiny counts:
    every mode journals every stream whole (the script reads each back and exits non-zero
    otherwise) and reports a figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "commit_floor.py"), "--streams", "50",
         "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"keepstream", "no-created-index", "without-rowid"}
    for creation, terminal, both in rows.values():
        assert float(creation) > 0 and float(terminal) > 0
        assert abs(float(creation) + float(terminal) - float(both)) < 0.2


def test_connection_floor_runs_every_mode() -> None:
    """``benchmarks/connection_floor.py`` (a short request's cost on trio and asyncio, no HTTP
    library) on tiny counts: every mode answers every request byte for byte (the client
    exits non-zero otherwise, and the script fails when fewer answers came back) and reports a
    figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "connection_floor.py"), "--requests", "20",
         "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"trio-server", "asyncio-server", "protocol-server", "trio-relay",
                         "asyncio-relay", "protocol-relay"}
    for cpu, p50, p99 in rows.values():
        assert float(cpu) > 0 and 0 < float(p50) <= float(p99)
