"""The Hypercorn CLI entry point: ``hypercorn --worker-class trio keepstream.asgi:app``.

Config comes from ``KEEPSTREAM_CONFIG``; the supervisor lives in the ASGI lifespan task. Hypercorn
owns the signals there (DESIGN section 5), so shutdown differs from ``keepstream serve``; these
tests pin down exactly what docs/operations.md says about it:

* after SIGTERM, Hypercorn stops accepting within its 0.1 s poll, but its parent process keeps the
  listening socket open: a new connection (a readiness probe, a new stream) gets no answer at all,
  not a 503;
* streams in flight run on with their clients for ``--graceful-timeout``; streams that end in it
  are ``completed``; the others have their client cut without a proper end of response (no
  reconnect event) when it expires;
* only then does the lifespan shut down: the cut streams go on upstream -> journal for up to
  ``drain_delay + drain_timeout`` and are then ``interrupted`` (I1, I2 hold);
* the process exits 0 after about ``graceful_timeout + drain_delay + drain_timeout``.

The SIGTERM scenario runs with N in {1, 10, 100} at a seeded random moment, and once with a
second SIGTERM (no effect). Also: two instances on one journal (``hypercorn --workers N`` runs
start-up recovery in every worker) must never orphan each other's live records (I5), and a worker
SIGKILLed at a random moment has its open records orphaned by the next start (I5, row 11).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from keepstream.testing import ChaosResult, FakeResponseSpec, FakeUpstream, chaos_request

from .test_lifecycle import (
    LONG,
    RECONNECT,
    SHORT,
    check_journal_against_upstream,
    exchange_for,
    open_journal,
    write_config,
)

STOP_GRACE = 10.0
GRACEFUL_TIMEOUT = 2  # seconds; the CLI flag takes an integer
DRAIN_TIMEOUT = 1.0
PERSIST_TIMEOUT = 1.0
#: Hypercorn's parent sets a flag on SIGTERM; each worker polls it every 0.1 s.
HYPERCORN_POLL = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Hypercorn:
    proc: trio.Process
    port: int
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


async def start_hypercorn(
    config: Path, *extra: str, graceful_timeout: int = GRACEFUL_TIMEOUT, name: str = "hc"
) -> Hypercorn:
    """Run the documented command line and wait until keepstream answers its health check."""
    port = free_port()
    stderr_path = config.parent / f"{name}-stderr.txt"
    with stderr_path.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypercorn", "--worker-class", "trio",
             "--bind", f"127.0.0.1:{port}", "--graceful-timeout", str(graceful_timeout),
             *extra, "keepstream.asgi:app"],
            env=dict(os.environ, KEEPSTREAM_CONFIG=str(config)),
            stdout=subprocess.DEVNULL, stderr=err,
        )
    with trio.fail_after(20):
        while True:
            assert proc.returncode is None, stderr_path.read_text()
            res = await chaos_request(port, "GET", "/_keepstream/healthz", timeout=1)
            if res.status == 200:
                break
            await trio.sleep(0.05)
    return Hypercorn(proc, port, stderr_path)


async def test_hypercorn_entry_proxies_and_journals_byte_exact(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=DRAIN_TIMEOUT)
    hc = await start_hypercorn(toml)
    spec = FakeResponseSpec(events=25, style="llm", interval=0.002)
    payload = b'{"model":"m","stream":true}'
    with trio.fail_after(30):
        sse = await chaos_request(hc.port, "GET", "/v1/chat", headers=spec.headers())
        post = await chaos_request(hc.port, "POST", "/echo", body=payload,
                                   headers=[("Content-Type", "application/json")])
        ready = await chaos_request(hc.port, "GET", "/_keepstream/readyz")
        hc.proc.send_signal(signal.SIGTERM)
        code = await hc.proc.wait()
    assert code == 0, hc.stderr()
    assert ready.status == 200
    assert sse.status == 200 and sse.complete and sse.body == spec.expected_body()
    assert post.status == 200 and post.complete and post.body == payload
    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        rows = {r["id"]: r for r in backend.list_records(None, 100)}
        assert len(rows) == 2
        for res, expected in ((sse, spec.expected_body()), (post, payload)):
            sid = res.header("keepstream-id")
            assert sid is not None
            row = rows[sid.decode()]
            assert row["status"] == "completed" and row["bytes"] == len(expected)
            assert backend.read_body(row["id"]) == expected
    finally:
        backend.close()


@pytest.mark.parametrize(("n", "second_signal"),
                         [(1, False), (10, False), (100, False), (10, True)])
async def test_hypercorn_sigterm_during_live_streams(
    fake_upstream: FakeUpstream, tmp_path: Path, n: int, second_signal: bool
) -> None:
    """Row 10 under the Hypercorn CLI: N streams (half end in ~1 s, half last 20 s); SIGTERM at
    a seeded U(0, 5 s) after they all started. ``second_signal``: another SIGTERM 0.5 s after
    the first, which docs/operations.md says changes nothing (same outcome, same exit time)."""
    delay = random.Random(f"hc-row10-{n}-{second_signal}").uniform(0.0, 5.0)
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=DRAIN_TIMEOUT,
                            persist_timeout=PERSIST_TIMEOUT, stop_grace=STOP_GRACE)
    hc = await start_hypercorn(toml)
    specs = {f"/hc/s{i}": LONG if i % 2 == 0 else SHORT for i in range(n)}
    results: dict[str, ChaosResult] = {}
    ended_at: dict[str, float] = {}
    killed = False
    signal_at = 0.0

    async def client(path: str, spec: FakeResponseSpec) -> None:
        results[path] = await chaos_request(hc.port, "GET", path, headers=spec.headers(),
                                            timeout=STOP_GRACE + 5)
        ended_at[path] = trio.current_time() - signal_at

    async def kill_at_stop_grace() -> None:
        nonlocal killed
        await trio.sleep_until(signal_at + STOP_GRACE)
        if hc.proc.returncode is None:
            killed = True
            hc.proc.kill()

    with trio.fail_after(STOP_GRACE + 20):
        async with trio.open_nursery() as nursery:
            for path, spec in specs.items():
                nursery.start_soon(client, path, spec)
            await fake_upstream.wait_exchanges(n)
            while any(ex.headers_sent_at is None for ex in fake_upstream.exchanges[:n]):
                await trio.sleep(0.005)
            await trio.sleep(delay)
            signal_at = trio.current_time()
            hc.proc.send_signal(signal.SIGTERM)
            nursery.start_soon(kill_at_stop_grace)
            if second_signal:
                await trio.sleep(0.5 - 3 * HYPERCORN_POLL)
                hc.proc.send_signal(signal.SIGTERM)
            # Once the worker has seen the flag, a new connection is never answered: the
            # parent still holds the listening socket, nobody accepts from it.
            await trio.sleep(3 * HYPERCORN_POLL)
            probe = await chaos_request(hc.port, "GET", "/_keepstream/readyz", timeout=0.5)
            assert probe.status is None, probe
            new = await chaos_request(hc.port, "GET", "/hc/new", headers=LONG.headers(),
                                      timeout=0.5)
            assert new.status is None, new
            code = await hc.proc.wait()
            exit_after = trio.current_time() - signal_at
            while len(results) < n:  # every client already saw its end (checked below)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # the SIGKILL timer
    assert not killed, hc.stderr()
    assert code == 0, hc.stderr()
    assert not any(ex.request_target == "/hc/new" for ex in fake_upstream.exchanges)

    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        rows = backend.list_records(None, 100)
        assert len(rows) == n  # I1: one record per stream, every one terminal
        bodies = check_journal_against_upstream(backend, fake_upstream, rows)  # I2 (J)
    finally:
        backend.close()
    cut_at: list[float] = []
    ran_on: list[int] = []
    for row in rows:
        path = row["path"]
        res = results[path]
        body = bodies[row["id"]]
        ex = exchange_for(fake_upstream, path)
        assert res.header("x-fake-exchange") == str(ex.index).encode()
        if specs[path] is SHORT:
            # Ended inside the graceful timeout: completed, client got all of it.
            assert row["status"] == "completed", row
            assert res.complete and res.body == body == SHORT.expected_body()
            continue
        assert row["status"] == "interrupted", row
        assert row["reason"] == "shutdown after drain deadline"
        # Hypercorn cut the client at graceful_timeout: no proper end, no reconnect event...
        assert not res.complete and RECONNECT not in res.raw, res
        assert GRACEFUL_TIMEOUT <= ended_at[path] <= GRACEFUL_TIMEOUT + 2 * HYPERCORN_POLL + 0.2
        cut_at.append(ended_at[path])
        # ...and the stream went on into the journal (finish policy) until the drain ended.
        assert body.startswith(res.body)
        assert row["client_gone_at"] is not None
        ran_on.append(len(body) - len(res.body))
    assert min(ran_on) > 0
    budget = GRACEFUL_TIMEOUT + DRAIN_TIMEOUT
    assert budget <= exit_after <= budget + PERSIST_TIMEOUT + 0.5 + HYPERCORN_POLL, exit_after
    print(f"\nhypercorn CLI, N={n}{', second SIGTERM at +0.5 s' if second_signal else ''}: "
          f"SIGTERM at +{delay:.3f} s -> clients of long streams cut at "
          f"{min(cut_at):.3f}-{max(cut_at):.3f} s (graceful_timeout {GRACEFUL_TIMEOUT:g}); "
          f"journal ran on {min(ran_on)}-{max(ran_on)} B past the client; "
          f"exit 0 after {exit_after:.3f} s (graceful {GRACEFUL_TIMEOUT:g} + drain "
          f"{DRAIN_TIMEOUT:g})")


async def test_two_instances_on_one_journal_never_orphan_a_live_record(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """I5: ``hypercorn --workers 2`` runs the lifespan, so start-up recovery, in each worker. A
    worker that starts (or restarts) later must not orphan a sibling's live stream. Two
    Hypercorn processes on one journal show it deterministically. The live stream pauses (as
    LLM streams do between events): while it receives nothing its row is not rewritten, so a
    wrong ``orphaned`` stays visible (with traffic the next flush flips it back to ``open``)."""
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=DRAIN_TIMEOUT)
    first = await start_hypercorn(toml, name="first", graceful_timeout=1)
    spec = FakeResponseSpec(events=10, stall_after=3, style="plain")
    result: list[ChaosResult] = []
    second: Hypercorn | None = None
    statuses: list[str] = []

    def status_now() -> str:
        backend = open_journal(db)
        try:
            (row,) = backend.list_records(None, 10)
        finally:
            backend.close()
        return str(row["status"])

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def client() -> None:
                    result.append(await chaos_request(first.port, "GET", "/live",
                                                      headers=spec.headers()))

                nursery.start_soon(client)
                await fake_upstream.wait_exchanges(1)
                await trio.sleep(0.2)
                statuses.append(status_now())
                second = await start_hypercorn(toml, name="second")  # its recovery has run
                await trio.sleep(0.2)
                statuses.append(status_now())
                first.proc.send_signal(signal.SIGTERM)
                assert await first.proc.wait() == 0
    finally:
        for hc in (first, second):
            if hc is not None and hc.proc.returncode is None:
                hc.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            for hc in (first, second):
                if hc is not None:
                    await hc.proc.wait()
    statuses.append(status_now())
    assert result and result[0].body == spec.expected_body()[: len(result[0].body)]
    assert statuses == ["open", "open", "interrupted"]


async def test_hypercorn_stalled_clients_still_exit_and_persist(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """I1 under the Hypercorn CLI: clients that stop reading without closing must not keep
    records ``open`` past the platform's SIGKILL. With ``client_stall_timeout = 1`` the kernel
    would drop them (as under ``keepstream serve``)."""
    stop_grace = 6.0
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=DRAIN_TIMEOUT,
                            stop_grace=stop_grace, extra_server="client_stall_timeout = 1.0\n")
    hc = await start_hypercorn(toml)
    spec = FakeResponseSpec(events=30000, event_size=1000, style="plain", interval=0.002)
    with trio.fail_after(stop_grace + 20):
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(partial(
                    chaos_request, hc.port, "GET", f"/stall/{i}", headers=spec.headers(),
                    stall_after_bytes=5000, recv_buffer=4096, hold=stop_grace + 5))
            await fake_upstream.wait_exchanges(2)
            await trio.sleep(0.5)
            signal_at = trio.current_time()
            hc.proc.send_signal(signal.SIGTERM)
            with trio.move_on_at(signal_at + stop_grace):
                await hc.proc.wait()
            exited = hc.proc.returncode is not None
            if not exited:
                hc.proc.kill()  # as the platform would
                await hc.proc.wait()
            exit_after = trio.current_time() - signal_at
            nursery.cancel_scope.cancel()
    backend = open_journal(db)
    try:
        statuses = [r["status"] for r in backend.list_records(None, 10)]
    finally:
        backend.close()
    print(f"\nhypercorn CLI, stalled clients: exited={exited} after {exit_after:.3f} s; "
          f"statuses {statuses}")
    assert exited and hc.proc.returncode == 0
    assert len(statuses) == 2 and set(statuses) <= {"completed", "interrupted"}


async def test_hypercorn_worker_sigkill_then_restart_orphans_its_records(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Row 11 (I5) under the Hypercorn CLI: the worker that holds the streams is SIGKILLed at a
    random moment (no cleanup at all; Hypercorn's parent reaps it and exits non-zero), then the
    same command starts again on the same journal. Its lifespan recovery must turn every record
    the dead worker left ``open`` into ``orphaned`` before it serves: 0 integrity errors, J for
    every record, the finished one still ``completed``. ``KEEPSTREAM_HC_ROW11_CYCLES`` cycles
    (default 5)."""
    cycles = int(os.environ.get("KEEPSTREAM_HC_ROW11_CYCLES", "5"))
    rng = random.Random("hc-row11")
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=DRAIN_TIMEOUT)
    paced = FakeResponseSpec(events=300, event_size=1000, interval=0.01, style="plain")
    quick = FakeResponseSpec(events=5, style="plain")
    orphaned = 0
    codes: list[int] = []
    hc = await start_hypercorn(toml, name="hc0")
    try:
        with trio.fail_after(30 + 10 * cycles):
            for cycle in range(cycles):
                paths = {f"/k{cycle}/s{i}": paced for i in range(3)}
                paths[f"/k{cycle}/quick"] = quick
                first = len(fake_upstream.exchanges)
                async with trio.open_nursery() as nursery:
                    for path, spec in paths.items():
                        nursery.start_soon(partial(chaos_request, hc.port, "GET", path,
                                                   headers=spec.headers(), timeout=10))
                    await fake_upstream.wait_exchanges(first + len(paths))
                    while any(ex.headers_sent_at is None
                              for ex in fake_upstream.exchanges[first:]):
                        await trio.sleep(0.002)
                    await trio.sleep(rng.uniform(0.1, 0.8))
                    backend = open_journal(db)
                    try:
                        (owner,) = {r["instance"] for r in backend.list_records(None, 10_000)
                                    if r["status"] == "open"}
                    finally:
                        backend.close()
                    os.kill(int(owner.split("/")[1]), signal.SIGKILL)  # the worker
                    # Its parent reaps it and gives up (Hypercorn 0.18 then exits 0, not an
                    # error status: its _join_exited runs twice and the second returns 0).
                    codes.append(await hc.proc.wait())
                hc = await start_hypercorn(toml, name=f"hc{cycle + 1}")  # recovery has run
                backend = open_journal(db)
                try:
                    assert backend.integrity_check() == []
                    rows = [r for r in backend.list_records(None, 10_000)
                            if r["path"] in paths]
                    assert len(rows) == len(paths)
                    check_journal_against_upstream(backend, fake_upstream, rows)
                finally:
                    backend.close()
                for row in rows:
                    if row["path"].endswith("/quick"):
                        assert row["status"] == "completed", row
                    else:
                        assert row["status"] == "orphaned", row
                        assert row["reason"] == "found open at start-up"
                        assert row["instance"] == owner
                        orphaned += 1
            hc.proc.send_signal(signal.SIGTERM)
            assert await hc.proc.wait() == 0, hc.stderr()
    finally:
        if hc.proc.returncode is None:
            hc.proc.kill()
            with trio.CancelScope(shield=True):
                await hc.proc.wait()
    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        statuses = [r["status"] for r in backend.list_records(None, 10_000)]
    finally:
        backend.close()
    assert len(statuses) == 4 * cycles and set(statuses) <= {"completed", "orphaned"}
    print(f"\nhypercorn CLI row 11: {cycles} worker SIGKILLs and restarts, {orphaned} records "
          f"orphaned at restart, {len(statuses)} records, 0 integrity errors; Hypercorn's exit "
          f"status after its worker was killed: {sorted(set(codes))}")
