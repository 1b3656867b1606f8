"""FAULTS row 14: many connections, fd exhaustion. ``keepstream serve`` runs with
``RLIMIT_NOFILE = 256``; 2,000 idle connections arrive while 10 streams are live, then 50 real
streams. Live streams are unaffected; every stream of the storm ends in a record satisfying J
(terminal, journaled bytes a prefix of the upstream's, all of them when ``completed``); the
accept loop recovers once the idle connections are gone (``keep_alive_timeout`` closes them);
the process never dies. Loopback only, bounded.
"""

from __future__ import annotations

import resource
import socket
from pathlib import Path

import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream._journal import SQLiteBackend
from keepstream.testing import (
    ChaosResult,
    FakeResponseSpec,
    FakeUpstream,
    chaos_request,
    run_keepstream_process,
)

NOFILE = 256
IDLE = 2000
LIVE = 10
STORM = 50


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that never send a byte (non-blocking connects; past the server's
    backlog the kernel keeps retrying them)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


async def test_row14_fd_exhaustion(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 1000), hard))
    idle_n = min(IDLE, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 500)
    db = tmp_path / "j.db"
    cfg = Config(
        routes=(Route(prefix="/", upstream=fake_upstream.url),),
        server=ServerConfig(drain_timeout=2.0, stop_grace=10.0, keep_alive_timeout=1.0),
        journal=JournalConfig(url=f"sqlite:///{db}", flush_interval_ms=20),
    )
    live_spec = FakeResponseSpec(events=80, interval=0.05, style="plain")
    storm_spec = FakeResponseSpec(events=10, style="plain")
    live: list[ChaosResult] = []
    storm: list[ChaosResult] = []
    idle: list[socket.socket] = []
    with trio.fail_after(120):
        async with run_keepstream_process(cfg, workdir=tmp_path, nofile=NOFILE) as ks:
            try:
                async with trio.open_nursery() as nursery:

                    async def one(path: str, spec: FakeResponseSpec,
                                  out: list[ChaosResult]) -> None:
                        out.append(await chaos_request(ks.port, "GET", path,
                                                       headers=spec.headers(), timeout=60))

                    for i in range(LIVE):
                        nursery.start_soon(one, f"/live{i}", live_spec, live)
                    await fake_upstream.wait_exchanges(LIVE)
                    idle = _open_idle(ks.port, idle_n)
                    await trio.sleep(0.5)
                    for i in range(STORM):
                        nursery.start_soon(one, f"/storm{i}", storm_spec, storm)
            finally:
                for s in idle:
                    s.close()
            assert ks.returncode is None, ks.stderr()[-2000:]
            after = await chaos_request(ks.port, "GET", "/after",
                                        headers=storm_spec.headers(), timeout=20)
            assert after.status == 200 and after.complete
    assert ks.returncode == 0
    emfile = ks.stderr().count("accept returned EMFILE")
    assert emfile > 0, "the fault was not injected: the server never ran out of fds"
    # Live streams: unaffected.
    assert len(live) == LIVE
    for res in live:
        assert res.status == 200 and res.complete and res.body == live_spec.expected_body()
    # The storm: every request answered or refused, never hung.
    assert len(storm) == STORM
    served = [r for r in storm if r.status == 200 and r.complete]
    refused = [r for r in storm if r.status is not None and r.status >= 500]
    failed = [r for r in storm if r.status is None]
    # J for every record in the journal.
    backend = SQLiteBackend(str(db))
    backend.setup()
    try:
        rows = backend.list_records(None, 10_000)
        bad = []
        for row in rows:
            body = backend.read_body(str(row["id"]))
            spec = live_spec if str(row["path"]).startswith("/live") else storm_spec
            expected = spec.expected_body()
            ok = row["status"] != "open" and expected.startswith(body) and \
                (row["status"] != "completed" or body == expected)
            if not ok:
                bad.append((row["path"], row["status"], len(body)))
    finally:
        backend.close()
    storm_rows = [r for r in rows if str(r["path"]).startswith("/storm")]
    not_completed = sorted(f"{r['status']}: {r['reason']}" for r in storm_rows
                           if r["status"] != "completed")
    print(f"\nrow 14: RLIMIT_NOFILE {NOFILE}, {idle_n} idle connections ({emfile} EMFILE "
          f"accept retries): {LIVE}/{LIVE} live "
          f"streams complete and exact; storm of {STORM}: {len(served)} served, "
          f"{len(refused)} refused 5xx {sorted(r.status or 0 for r in refused)}, "
          f"{len(failed)} without an answer; "
          f"{len(storm_rows)} storm records {not_completed}, "
          f"{len(rows) - len(bad)}/{len(rows)} satisfy J")
    assert bad == []
    assert len(served) + len(refused) + len(failed) == STORM
    # "Never hung": every storm request got an answer (served, or refused 5xx fast), and
    # every served one has its record (which satisfies J, above).
    assert failed == [], [(r.error, r.send_error) for r in failed]
    # The upstream is healthy: a refusal is keepstream out of descriptors, a fast 503 (with
    # Retry-After), never a 502 that blames the upstream.
    assert all(r.status == 503 for r in refused), sorted(r.status or 0 for r in refused)
    assert len(storm_rows) >= len(served)


async def test_no_descriptor_for_the_upstream_is_a_503_then_recovers(
    fake_upstream: FakeUpstream,
) -> None:
    """In-process, the real upstream transport: with this process out of file descriptors a
    new stream's upstream connect fails on ``socket()`` (EMFILE). That is keepstream's own
    limit, not the upstream's fault: 503 (Retry-After), reason naming it; once descriptors
    free up the next stream is served."""
    import os

    from keepstream import open_proxy

    cfg = Config(server=ServerConfig(bind="127.0.0.1:0"), journal=JournalConfig(url="memory:"),
                 routes=(Route(prefix="/", upstream=fake_upstream.url),))
    spec = FakeResponseSpec(events=3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            hog: list[socket.socket] = []
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE,
                                   (len(os.listdir("/proc/self/fd")) + 8, hard))
                try:
                    while True:
                        hog.append(socket.socket())
                except OSError:
                    pass
                async with proxy.open_stream("GET", "/x", headers=spec.headers()) as handle:
                    assert handle.status_code == 503
                    assert await handle.wait_finished() == "upstream_error"
            finally:
                for s in hog:
                    s.close()
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            row = await proxy.supervisor.writer.get(handle.id)
            assert row is not None and row["reason"].startswith("no local resources")
            async with proxy.open_stream("GET", "/y", headers=spec.headers()) as again:
                assert again.status_code == 200
                assert b"".join([c async for c in again]) == spec.expected_body()
