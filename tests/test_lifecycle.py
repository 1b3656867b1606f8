"""FAULTS row 10 (I1, I2, I4): SIGTERM at a random moment with N live streams, real processes.

``keepstream serve`` runs as a subprocess (as under Docker or Kubernetes) in front of the fake
upstream; N SSE clients stream through it; SIGTERM arrives at a seeded random moment and a SIGKILL
is scheduled ``stop_grace`` after it, as ``docker stop`` does. What is checked:

* readiness turns 503 within 100 ms of the signal (seen by a probe in a process of its own, as a
  kubelet's; this test process also runs N clients and the upstream, whose event-loop lag on a
  loaded 2-core box alone exceeded 100 ms), and a new stream is refused 503 + Retry-After;
* the process exits 0 before the SIGKILL, every run (and within the validated shutdown budget);
* the journal holds exactly N records, each terminal (``completed`` or ``interrupted``), each a
  byte-exact prefix of what the upstream sent for that stream (all of it when ``completed``);
* a client whose stream was cut got the ``keepstream-reconnect`` event and a proper end of
  response; a completed one got the exact body.

Also: a second SIGTERM skips the rest of the drain, and ``--workers 2`` drains both workers.
The helpers here are shared with tests/test_crash_recovery.py and tests/test_hypercorn_entry.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from keepstream._config import SHUTDOWN_MARGIN
from keepstream._journal import SQLiteBackend
from keepstream.testing import (
    ChaosResult,
    FakeResponseSpec,
    FakeUpstream,
    KeepstreamProcess,
    chaos_request,
    start_keepstream_process,
)

KEEPSTREAM = [sys.executable, "-m", "keepstream"]
RECONNECT = b"event: keepstream-reconnect"

DRAIN_TIMEOUT = 1.5
STOP_GRACE = 10.0
PERSIST_TIMEOUT = 1.0
#: FAULTS row 10: the SIGTERM comes at U(0, 5 s) (here: after every stream got its head).
SIGNAL_WINDOW = 5.0
#: Ends well inside the drain: ~1 s of events, all started before the signal.
SHORT = FakeResponseSpec(events=20, interval=0.05, style="plain")
#: Outlives any drain here (20 s): always cut by the shutdown.
LONG = FakeResponseSpec(events=400, interval=0.05, style="plain")


# -- shared helpers ---------------------------------------------------------------------------


def write_config(
    tmp_path: Path,
    upstream_url: str,
    *,
    drain_timeout: float = DRAIN_TIMEOUT,
    stop_grace: float = STOP_GRACE,
    persist_timeout: float = PERSIST_TIMEOUT,
    bind: str = "127.0.0.1:0",
    journal: str = "ks.db",
    extra_server: str = "",
    extra_journal: str = "",
) -> tuple[Path, Path]:
    """Write a TOML config to ``tmp_path``; return (config path, SQLite journal path)."""
    db = tmp_path / journal
    toml = tmp_path / "keepstream.toml"
    toml.write_text(
        f'[server]\nbind = "{bind}"\ndrain_timeout = {drain_timeout}\n'
        f"stop_grace = {stop_grace}\npersist_timeout = {persist_timeout}\n{extra_server}"
        f'[journal]\nurl = "sqlite:///{db}"\n{extra_journal}'
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream_url}"\non_disconnect = "finish"\n'
    )
    return toml, db


#: A ``keepstream serve`` subprocess (the toolkit's harness: no private copy here).
Server = KeepstreamProcess


async def start_serve(config: Path, *extra: str) -> Server:
    """Start ``keepstream serve --config FILE`` and wait for its "listening on" line."""
    return await start_keepstream_process(config, *extra, workdir=config.parent)


def open_journal(db: Path) -> SQLiteBackend:
    backend = SQLiteBackend(str(db))
    backend.setup()
    return backend


def exchange_for(upstream: FakeUpstream, path: str) -> Any:
    """The upstream exchange whose request target is ``path`` (exactly one)."""
    found = [ex for ex in upstream.exchanges if ex.request_target == path]
    assert len(found) == 1, (path, len(found))
    return found[0]


def parse_reconnect(tail: bytes) -> tuple[bytes | None, dict[str, Any]]:
    """Parse the reconnect event sent after the journaled bytes: (id line value, payload)."""
    if tail.startswith(b"\n\n"):
        tail = tail[2:]  # the upstream stopped inside an event: a blank line ends it first
    assert tail.startswith(RECONNECT + b"\n"), tail[:200]
    assert tail.endswith(b"\n\n"), tail[-200:]
    fields: dict[bytes, bytes] = {}
    for line in tail[:-2].split(b"\n")[1:]:
        name, _, value = line.partition(b": ")
        fields[name] = value
    return fields.get(b"id"), json.loads(fields[b"data"])


def check_journal_against_upstream(
    backend: SQLiteBackend, upstream: FakeUpstream, rows: list[dict[str, Any]]
) -> dict[str, bytes]:
    """J for every record: the journal body is a byte-exact prefix of what the upstream sent for
    the same request (all of it when completed), and the bytes column agrees. Returns id -> body.

    The fake upstream adds a write to ``body_sent`` once ``send_all`` returned. When keepstream
    died in the middle of one (SIGKILL while the socket buffer was full), part of that last write
    may have reached keepstream and the journal: there the journal is checked against the bytes
    the upstream was writing (its deterministic body), at most one write past ``body_sent``.
    """
    bodies: dict[str, bytes] = {}
    for row in rows:
        body = backend.read_body(row["id"])
        bodies[row["id"]] = body
        assert row["bytes"] == len(body), row
        matches = [ex for ex in upstream.exchanges if ex.request_target == row["path"]]
        if not matches:
            # Killed between the record's creation and the upstream request: nothing journaled.
            assert body == b"", row
            continue
        (ex,) = matches
        sent = bytes(ex.body_sent)
        if row["status"] == "completed":
            assert body == sent and ex.finished_writing, row
            continue
        spec = FakeResponseSpec.from_headers(ex.request_headers)
        writing = spec.expected_body()
        assert writing.startswith(sent)
        assert writing.startswith(body), row
        in_flight = spec.event_size if ex.peer_closed_first and spec.interval else 0
        assert len(body) <= len(sent) + in_flight, (row, len(body), len(sent))
    return bodies


# -- the row 10 scenario ----------------------------------------------------------------------

#: A readiness probe in a process of its own (as a kubelet's is): a new connection per probe,
#: every 2 ms. It prints "polling" after a first 200, then the ``time.monotonic()`` (one clock
#: for every process on Linux) at which the first 503 answer arrived, and exits.
READINESS_PROBE = r"""
import socket, sys, time
port = int(sys.argv[1])
def probe():
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /_keepstream/readyz HTTP/1.1\r\nHost: probe\r\n"
                  b"Connection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            data = s.recv(4096)
            if not data:
                raise SystemExit(f"no answer: {head!r}")
            head += data
    return int(head.split()[1])
if probe() != 200:
    raise SystemExit("not ready before the signal")
print("polling", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    status = probe()
    if status == 503:
        print(repr(time.monotonic()), flush=True)
        raise SystemExit(0)
    if status != 200:
        raise SystemExit(f"readyz answered {status}")
    time.sleep(0.002)
raise SystemExit("never 503")
"""


async def _read_line(stream: trio.abc.ReceiveStream, buf: bytearray) -> str:
    while b"\n" not in buf:
        data = await stream.receive_some(4096)
        assert data, f"the readiness probe ended: {bytes(buf)!r}"
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()



@dataclass
class DrainOutcome:
    signal_at: float
    ready_503_after: float
    exit_after: float
    exit_code: int
    killed: bool
    results: dict[str, ChaosResult] = field(default_factory=dict)
    specs: dict[str, FakeResponseSpec] = field(default_factory=dict)


async def run_drain_scenario(
    upstream: FakeUpstream,
    server: Server,
    n: int,
    *,
    signal_delay: float,
    spec_for: Callable[[int], FakeResponseSpec],
    prefix: str,
    second_signal_after: float | None = None,
    stagger: float = 0.0,
    enough: Callable[[], bool] | None = None,
) -> DrainOutcome:
    """N streams, SIGTERM ``signal_delay`` after all of them have their response head, then
    readiness and refusal checks, SIGKILL scheduled at ``stop_grace`` after the signal.

    ``enough``: after the N streams started, more LONG streams are added (up to 30) until it
    returns True (``--workers``: until every worker holds a live stream)."""
    proc = server.proc
    results: dict[str, ChaosResult] = {}
    specs = {f"{prefix}/s{i}": spec_for(i) for i in range(n)}
    out = DrainOutcome(0.0, -1.0, -1.0, -1, False, results, specs)

    async def client(path: str, spec: FakeResponseSpec) -> None:
        results[path] = await chaos_request(server.port, "GET", path, headers=spec.headers(),
                                            timeout=STOP_GRACE + 10)

    async def kill_at_stop_grace() -> None:
        await trio.sleep_until(out.signal_at + STOP_GRACE)
        if proc.returncode is None:
            out.killed = True
            proc.kill()

    async with trio.open_nursery() as nursery:
        for path, spec in specs.items():
            nursery.start_soon(client, path, spec)
            if stagger:
                await trio.sleep(stagger)
        await upstream.wait_exchanges(n)
        if enough is not None:
            for extra in range(30):
                await trio.sleep(0.05)
                if enough():
                    break
                path = f"{prefix}/x{extra}"
                specs[path] = LONG
                nursery.start_soon(client, path, LONG)
                await upstream.wait_exchanges(len(specs))
            else:
                raise AssertionError("the extra streams never reached every worker")
        while any(ex.headers_sent_at is None for ex in upstream.exchanges[: len(specs)]):
            await trio.sleep(0.005)
        prober = await trio.lowlevel.open_process(
            [sys.executable, "-c", READINESS_PROBE, str(server.port)], stdout=subprocess.PIPE)
        try:
            assert prober.stdout is not None
            buf = bytearray()
            assert await _read_line(prober.stdout, buf) == "polling"
            await trio.sleep(signal_delay)
            out.signal_at = trio.current_time()
            signal_mono = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            nursery.start_soon(kill_at_stop_grace)
            # Readiness, as the separate probe saw it (its first 503 answer).
            out.ready_503_after = float(await _read_line(prober.stdout, buf)) - signal_mono
            assert await prober.wait() == 0
        finally:
            if prober.returncode is None:
                prober.kill()
                with trio.CancelScope(shield=True):
                    await prober.wait()
        probe = await chaos_request(server.port, "GET", "/_keepstream/readyz", timeout=2)
        assert probe.status == 503 and probe.header("retry-after") is not None, probe
        refused = await chaos_request(server.port, "GET", f"{prefix}/new",
                                      headers=LONG.headers(), timeout=2)
        assert refused.status == 503, refused
        assert refused.header("retry-after") == b"1"
        if second_signal_after is not None:
            await trio.sleep_until(out.signal_at + second_signal_after)
            proc.send_signal(signal.SIGTERM)
        out.exit_code = await proc.wait()
        out.exit_after = trio.current_time() - out.signal_at
        while len(results) < len(specs):  # the process is gone: every client sees its end
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # the SIGKILL timer
    assert not any(ex.request_target == f"{prefix}/new" for ex in upstream.exchanges)
    return out


def check_drain_outcome(
    out: DrainOutcome, upstream: FakeUpstream, db: Path, n: int, server: Server
) -> tuple[int, int]:
    """Everything row 10 promises, once the process is gone. Returns (completed, interrupted)."""
    assert not out.killed, f"SIGKILLed at stop_grace: {server.stderr()}"
    assert out.exit_code == 0, server.stderr()
    backend = open_journal(db)
    try:
        assert backend.integrity_check() == []
        rows = backend.list_records(None, 1000)
        assert len(rows) == n, (len(rows), n)
        assert {row["status"] for row in rows} <= {"completed", "interrupted"}
        bodies = check_journal_against_upstream(backend, upstream, rows)
    finally:
        backend.close()
    counts = {"completed": 0, "interrupted": 0}
    for row in rows:
        path = row["path"]
        ex = exchange_for(upstream, path)
        res = out.results[path]
        body = bodies[row["id"]]
        assert res.status == 200, res
        assert res.header("keepstream-id") == row["id"].encode()
        assert res.header("x-fake-exchange") == str(ex.index).encode()
        assert res.complete, (path, res.error)  # a proper end of response either way
        counts[row["status"]] += 1
        if row["status"] == "completed":
            assert body == out.specs[path].expected_body()
            assert res.body == body
            assert RECONNECT not in res.raw
            continue
        # Interrupted: the client got every journaled byte, then the reconnect event.
        assert res.body[: len(body)] == body
        event_id, payload = parse_reconnect(res.body[len(body):])
        assert payload["keepstream_id"] == row["id"]
        assert payload["status"] == "interrupted"
        offset = payload["offset"]
        assert 0 <= offset <= len(body)
        assert offset == 0 or body[:offset].endswith(b"\n\n")
        assert payload["resume"].endswith(f"/body?offset={offset}")
        ids = re.findall(rb"(?:^|\n)id: ([^\n]*)\n", body[:offset])
        if ids:  # the resume id is the last one the client got whole
            assert event_id == ids[-1]
            assert payload["last_event_id"] == ids[-1].decode()
    return counts["completed"], counts["interrupted"]


def instances_in(db: Path, path_filter: Callable[[str], bool] = lambda path: True) -> set[str]:
    """The keepstream instances (worker processes) that own records in the journal now (only
    records whose path passes ``path_filter``)."""
    backend = open_journal(db)
    try:
        return {row["instance"] for row in backend.list_records(None, 1000)
                if path_filter(row["path"])}
    finally:
        backend.close()


def _mixed(i: int) -> FakeResponseSpec:
    return LONG if i % 2 == 0 else SHORT


def _is_long(path: str) -> bool:
    """Whether ``path`` (``PREFIX/sI`` of :func:`_mixed`, or an extra ``PREFIX/xK``) is LONG."""
    name = path.rsplit("/", 1)[1]
    return name.startswith("x") or int(name[1:]) % 2 == 0


@pytest.mark.parametrize("n", [1, 10, 100])
async def test_row10_sigterm_at_random_moment(
    fake_upstream: FakeUpstream, tmp_path: Path, n: int
) -> None:
    rng = random.Random(f"row10-{n}-{os.environ.get('KEEPSTREAM_ROW10_SEED', '')}")
    delay = rng.uniform(0.0, SIGNAL_WINDOW)
    toml, db = write_config(tmp_path, fake_upstream.url)
    server = await start_serve(toml)
    with trio.fail_after(STOP_GRACE + 25):
        out = await run_drain_scenario(fake_upstream, server, n, signal_delay=delay,
                                       spec_for=_mixed, prefix=f"/n{n}")
    completed, interrupted = check_drain_outcome(out, fake_upstream, db, n, server)
    # Short streams end ~1 s after they start: inside the drain, whenever the signal came.
    # Long ones last 20 s: always cut.
    assert completed == n // 2 and interrupted == n - n // 2
    # The validated shutdown budget (drain_delay + drain_timeout + persist_timeout + margin).
    assert out.exit_after < DRAIN_TIMEOUT + PERSIST_TIMEOUT + SHUTDOWN_MARGIN, out.exit_after
    assert out.ready_503_after < 0.1, out.ready_503_after
    print(f"\nrow 10 N={n}: SIGTERM at +{delay:.3f} s; readyz 503 after "
          f"{out.ready_503_after * 1000:.1f} ms; exit 0 after {out.exit_after:.3f} s "
          f"(SIGKILL due at {STOP_GRACE:g} s); {completed} completed, {interrupted} interrupted")


async def test_row10_second_signal_skips_the_drain(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A long drain (6 s), cut short by a second SIGTERM 0.3 s after the first."""
    n = 10
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=6.0)
    server = await start_serve(toml)
    with trio.fail_after(STOP_GRACE + 25):
        out = await run_drain_scenario(fake_upstream, server, n, signal_delay=0.2,
                                       spec_for=lambda i: LONG, prefix="/twice",
                                       second_signal_after=0.3)
    completed, interrupted = check_drain_outcome(out, fake_upstream, db, n, server)
    assert (completed, interrupted) == (0, n)
    # Well before the first signal's drain deadline (6 s): the second one cut it short.
    assert out.exit_after < 0.3 + PERSIST_TIMEOUT + SHUTDOWN_MARGIN, out.exit_after
    backend = open_journal(db)
    try:
        reasons = {row["reason"] for row in backend.list_records(None, 100)}
    finally:
        backend.close()
    assert reasons == {"second signal"}
    assert "SIGTERM again: interrupting" in server.stderr()
    print(f"\nrow 10 second signal: exit 0 after {out.exit_after:.3f} s "
          f"(second SIGTERM at 0.3 s, drain_timeout 6 s)")


async def test_row10_workers_sigterm_drains_every_worker(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    n = 10
    rng = random.Random("row10-workers")
    delay = rng.uniform(0.0, SIGNAL_WINDOW)
    toml, db = write_config(tmp_path, fake_upstream.url)
    server = await start_serve(toml, "--workers", "2")
    with trio.fail_after(STOP_GRACE + 25):
        out = await run_drain_scenario(fake_upstream, server, n, signal_delay=delay,
                                       spec_for=_mixed, prefix="/w", stagger=0.03,
                                       # each worker holds a stream still live at the signal
                                       enough=lambda: len(instances_in(db, _is_long)) >= 2)
    total = len(out.specs)
    completed, interrupted = check_drain_outcome(out, fake_upstream, db, total, server)
    assert completed == n // 2 and interrupted == total - n // 2
    assert out.exit_after < DRAIN_TIMEOUT + PERSIST_TIMEOUT + SHUTDOWN_MARGIN, out.exit_after
    assert out.ready_503_after < 0.1, out.ready_503_after
    backend = open_journal(db)
    try:
        rows = backend.list_records(None, 100)
    finally:
        backend.close()
    instances = [row["instance"] for row in rows]
    assert len(set(instances)) == 2
    # Both workers drained: each had streams cut by its drain deadline (and the reconnect event,
    # checked above for every interrupted stream).
    assert len({row["instance"] for row in rows if row["status"] == "interrupted"}) == 2
    print(f"\nrow 10 --workers 2: SIGTERM at +{delay:.3f} s; readyz 503 after "
          f"{out.ready_503_after * 1000:.1f} ms; exit 0 after {out.exit_after:.3f} s; "
          f"records per worker {sorted(instances.count(i) for i in set(instances))}")


async def test_row10_stalled_clients_exit_before_stop_grace_at_full_budget(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Clients that stopped reading hold Hypercorn in shielded writes after the drain; the hard
    exit must still come before stop_grace when the config uses the whole budget that
    check-config accepts (drain_timeout + persist_timeout + margin == stop_grace; the defaults
    8 + 1 + 0.5 in 10 s are the same case). Scaled down to stop_grace 4 s."""
    stop_grace, drain = 4.0, 2.5
    toml, db = write_config(tmp_path, fake_upstream.url, drain_timeout=drain,
                            stop_grace=stop_grace)
    server = await start_serve(toml)
    spec = FakeResponseSpec(events=30000, event_size=1000, style="plain", interval=0.002)
    killed = False
    with trio.fail_after(stop_grace + 20):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(partial(
                    chaos_request, server.port, "GET", f"/stall/{i}", headers=spec.headers(),
                    stall_after_bytes=5000, recv_buffer=4096, hold=stop_grace + 5))
            await fake_upstream.wait_exchanges(3)
            await trio.sleep(0.5)
            signal_at = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            with trio.move_on_at(signal_at + stop_grace):
                await server.proc.wait()
            if server.proc.returncode is None:
                killed = True
                server.proc.kill()
                await server.proc.wait()
            exit_after = trio.current_time() - signal_at
            nursery.cancel_scope.cancel()
    backend = open_journal(db)
    try:
        rows = backend.list_records(None, 10)
        assert len(rows) == 3 and {r["status"] for r in rows} == {"interrupted"}
    finally:
        backend.close()
    print(f"\nstalled clients, full budget: exit after {exit_after:.3f} s "
          f"(stop_grace {stop_grace:g}), killed={killed}")
    assert not killed and server.proc.returncode == 0, exit_after
