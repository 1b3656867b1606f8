"""keepstream's CPU cost per forwarded event, side by side with peers, in one run.

    python benchmarks/run.py                  # every scenario, 3 repeats: 15-20 minutes
    python benchmarks/run.py --smoke          # tiny CI-sized run: checks that every peer
                                              # forwards every event and that a drain loses
                                              # no record; no timing claims
    python benchmarks/run.py --check          # exit 1 if a target (TARGETS) is missed

What runs (docs/performance.md explains it in full):

* ``upstream.py``: a raw-socket SSE origin, 100-byte events, one HTTP chunk (and one ``send()``)
  per event, either as fast as the socket takes them (bulk) or at a fixed rate (paced).
* each peer (proxy under test) as its own process, started once and reused for every run;
  peers are measured in turn, rotating the order on each repeat.
* ``loadgen.py``: the load client, N concurrent streams over raw sockets, checking every event.
* the ``direct`` peer is no process at all: the load client connects to the upstream itself. Its
  CPU per event is 0 by definition; its latency is the baseline of the "added latency" figures.
* the ``drain`` scenario starts a fresh keepstream per run (SQLite journal in the work
  directory), opens ``--drain-streams`` live streams, sends SIGTERM and times the exit; then it
  reads the journal (read-only) and checks that every record is terminal and its body a
  byte-exact prefix of what the upstream sent (and no shorter than what the client received).

The proxy is pinned to the first allowed CPU, the upstream, the load client and this script to
the second (when there are two). The proxy's CPU time is read from ``/proc/<pid>/stat``
(user + system, the whole process tree) right before the load starts and once the proxy has gone
quiet after it ended; ``cpu_us/event = cpu_seconds * 1e6 / events delivered``. Each figure is the
median over ``--repeat`` runs.

To add a peer, add an entry to ``PEERS``; to add a scenario, an entry to ``SCENARIOS``; to add
a target, an entry to ``TARGETS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _bench import cpu_times, is_upstream_prefix, tree_cpu_seconds, tree_rss_kib

HERE = Path(__file__).resolve().parent
PY = sys.executable


# -- peers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str
    describe: str
    #: (bind, upstream_url, state) -> argv; ``state`` is a path prefix unique to this peer.
    #: None: no proxy process, the load client connects to the upstream itself (``direct``).
    argv: Callable[[str, str, Path], list[str]] | None
    #: Python modules the peer needs (``pip install -e '.[bench]'``); missing: peer skipped
    requires: tuple[str, ...] = ()
    #: a ``keepstream serve`` command line: takes part in the drain scenario
    keepstream: bool = False
    #: a program the peer runs (on PATH); missing: peer skipped
    program: str | None = None

    def missing(self) -> list[str]:
        gone = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if self.program is not None and shutil.which(self.program) is None:
            gone.append(self.program)
        return gone


def nginx_argv(bind: str, upstream: str, state: Path) -> list[str]:
    """nginx as a streaming reverse proxy (the peer ``nginx``): one worker process,
    ``proxy_buffering off`` (each upstream chunk is written on as it arrives), upstream
    keep-alive, no access log. The configuration goes to a directory of its own."""
    prefix = Path(f"{state}-nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    up = upstream.removeprefix("http://").rstrip("/")
    temp = "\n".join(f"    {k}_temp_path {prefix}/{k};"
                     for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
{"user root;" if os.geteuid() == 0 else ""}
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
{temp}
    upstream up {{ server {up}; keepalive 256; }}
    server {{
        listen {bind};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
""")
    return ["nginx", "-p", str(prefix), "-e", "stderr", "-c", str(conf)]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("direct", "no proxy: the load client connects to the upstream itself (latency "
             "baseline; CPU per event 0 by definition)", None),
        Peer("keepstream-sqlite", "keepstream serve, journal sqlite (WAL, synchronous=NORMAL)",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--journal",
                                    f"sqlite:///{tmp}-journal.db"], keepstream=True),
        Peer("keepstream-lean", "keepstream serve --engine lean (its own HTTP/1.1 engine), "
             "journal sqlite",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--engine", "lean", "--journal",
                                    f"sqlite:///{tmp}-journal.db"], keepstream=True),
        Peer("keepstream-lean-none", "keepstream serve --engine lean, journal none (what the "
             "journal costs: keepstream-lean minus this)",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--engine", "lean", "--journal", "none"],
             keepstream=True),
        Peer("keepstream-none", "keepstream serve, journal none",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--journal", "none"], keepstream=True),
        Peer("minimal", "minimal relay: Hypercorn trio + httpx, no journal (baseline)",
             lambda bind, up, tmp: [PY, str(HERE / "minimal_relay.py"), "--bind", bind,
                                    "--upstream", up]),
        Peer("aiohttp", "aiohttp server + ClientSession relay, one write per chunk",
             lambda bind, up, tmp: [PY, str(HERE / "aiohttp_relay.py"), "--bind", bind,
                                    "--upstream", up], requires=("aiohttp",)),
        Peer("starlette", "Starlette StreamingResponse on uvicorn over httpx",
             lambda bind, up, tmp: [PY, str(HERE / "starlette_relay.py"), "--bind", bind,
                                    "--upstream", up],
             requires=("starlette", "uvicorn")),
        Peer("nginx", "nginx reverse proxy, one worker, proxy_buffering off (when installed)",
             nginx_argv, program="nginx"),
    ]
}
BASELINE = "minimal"
DIRECT = "direct"  # the peer whose latency the "added latency" figures subtract
SUBJECT = "keepstream-sqlite"  # the peer the ratio lines and the targets are about
DEFAULT_PEERS = ["direct", "keepstream-sqlite", "keepstream-lean", "keepstream-none", "minimal",
                 "aiohttp", "starlette", "nginx"]


# -- scenarios --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    streams: int
    events: int  # per stream
    path: str
    latency: bool
    timeout: float
    offered: float | None = None  # events/s the upstream tries to send in all (paced)
    sequential: bool = False  # one request after another, a new connection each (ttfb)
    rss: bool = False  # sample the proxy's RSS during the load (idle)


@dataclass(frozen=True)
class Scenario:
    name: str
    describe: str
    load: Callable[[argparse.Namespace], Load]
    warmup: Callable[[argparse.Namespace], Load] | None
    #: run by ``run_drain`` (a fresh keepstream per run, SIGTERM mid-stream), not ``run_load``
    drain: bool = False


def _bulk(streams: int, events: int, batch: int) -> Load:
    # ts=0: a deterministic body, which the load client checks with one comparison per read.
    return Load(streams, events, f"/bulk?events={events}&ts=0&batch={batch}", False,
                timeout=60 + streams * events * 1e-3)


def _paced(streams: int, events: int, rate: float) -> Load:
    return Load(streams, events, f"/paced?events={events}&rate={rate:g}", True,
                timeout=60 + 5 * events / rate, offered=streams * rate)


def _idle(streams: int, seconds: float) -> Load:
    events = max(1, round(seconds))
    return Load(streams, events, f"/paced?events={events}&rate=1", False,
                timeout=60 + 5 * events, offered=float(streams), rss=True)


def _ttfb(requests: int) -> Load:
    return Load(requests, 1, "/bulk?events=1", False, timeout=60 + requests * 0.1,
                sequential=True)


#: drain: each stream would run for DRAIN_EVENTS / DRAIN_RATE s (far longer than any drain), so
#: every stream is mid-stream at SIGTERM; ``ts=0`` makes the upstream's bytes deterministic.
DRAIN_RATE = 2.0
DRAIN_EVENTS = 100_000


def _drain(streams: int) -> Load:
    return Load(streams, 0, f"/paced?events={DRAIN_EVENTS}&rate={DRAIN_RATE:g}&ts=0", False,
                timeout=60 + streams * 0.03)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "bulk", "upstream writes as fast as it can",
            lambda a: _bulk(a.streams or a.bulk_streams, a.events, a.bulk_batch),
            lambda a: _bulk(a.streams or a.bulk_streams, max(1, min(a.events, 100)),
                            a.bulk_batch),
        ),
        Scenario(
            "paced", "every stream at a fixed event rate",
            lambda a: _paced(a.streams or a.paced_streams,
                             max(1, round(a.rate * a.duration)), a.rate),
            lambda a: _paced(a.streams or a.paced_streams, max(1, round(a.rate * 0.2)), a.rate),
        ),
        Scenario(
            "idle", "many open streams at 1 event/s each: CPU per event and RSS per open stream",
            lambda a: _idle(a.idle_streams, a.duration),
            lambda a: _idle(min(a.idle_streams, 50), 1),
        ),
        Scenario(
            "ttfb", "short requests one after another, a new connection each: the figure is "
            "CPU per request, p50/p99 are time to first byte",
            lambda a: _ttfb(a.requests),
            lambda a: _ttfb(max(1, min(a.requests, 20))),
        ),
        Scenario(
            "drain", "SIGTERM with many live streams (a fresh keepstream per run, SQLite "
            "journal): exit time and code; every record terminal and byte-exact",
            lambda a: _drain(a.drain_streams), None, drain=True,
        ),
    ]
}


# -- processes --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer_env(src: str) -> dict[str, str]:
    """A peer's extra environment: ``NAME@DIR`` runs it with ``PYTHONPATH=DIR``; keepstream's
    default limit of 1,000 live streams would refuse streams of the larger loads."""
    return {**({"PYTHONPATH": src} if src else {}), "KEEPSTREAM_MAX_STREAMS": "20000"}


def _pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class Proc:
    """A child process with its output in a log file; ``stop()`` ends it (SIGTERM, then KILL)."""

    def __init__(self, name: str, argv: list[str], log: Path, cpu: int | None,
                 stdout_pipe: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._logf = log.open("wb")
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE if stdout_pipe else self._logf, stderr=self._logf,
            stdin=subprocess.DEVNULL, preexec_fn=_pinned(cpu), cwd=HERE.parent,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def tail(self, n: int = 20) -> str:
        self._logf.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._logf.close()


def _wait_port(proc: Proc, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise SystemExit(f"{proc.name} exited ({proc.p.returncode}):\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.name} did not listen on {port} within {timeout} s:\n{proc.tail()}")


def _settle(pid: int, quiet: float = 0.2, limit: float = 5.0) -> None:
    """Wait until ``pid``'s tree used no CPU (at tick resolution) for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last = tree_cpu_seconds(pid)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = tree_cpu_seconds(pid)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return


@dataclass
class Result:
    peer: str
    scenario: str
    repeat: int
    streams: int
    events: int
    cpu_s: float
    wall_s: float
    gen_cpu_s: float
    other_cpu_s: float  # time the proxy's CPU spent on anything but the proxy (incl. steal)
    gen_other_cpu_s: float  # the same for the load generator's CPU
    lat_p50_ms: float | None
    lat_p99_ms: float | None
    errors: list[str]
    offered: float | None = None
    rss_kib_per_stream: float | None = None

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s * 1e6 / self.events if self.events else float("nan")

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s else float("nan")


def _tree_cpu(proc: Proc | None) -> float:
    return tree_cpu_seconds(proc.pid) if proc is not None else 0.0


def run_load(name: str, peer: Proc | None, port: int, upstream: Proc, load: Load,
             gen_cpu: int | None, proxy_cpu: int | None, scenario: str, repeat: int,
             log: Path) -> Result:
    """One load run against ``port``; ``peer`` is the proxy process (None for ``direct``:
    no proxy, so no proxy CPU or memory to measure)."""
    argv = [PY, str(HERE / "loadgen.py"), "--target", f"127.0.0.1:{port}", "--path", load.path,
            "--streams", str(load.streams), "--expect", str(load.events), "--wait-go",
            "--timeout", str(load.timeout)]
    if load.latency:
        argv.append("--latency")
    if load.sequential:
        argv.append("--sequential")
    with log.open("ab") as errf:
        lg = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf,
                              preexec_fn=_pinned(gen_cpu), cwd=HERE.parent)
    assert lg.stdin is not None and lg.stdout is not None
    try:
        if lg.stdout.readline().strip() != b"READY":
            lg.wait()
            raise SystemExit(f"loadgen failed to start; see {log}")
        if peer is not None:
            _settle(peer.pid)
        cpu0, up0 = _tree_cpu(peer), tree_cpu_seconds(upstream.pid)
        busy0, steal0, _ = cpu_times(proxy_cpu) if proxy_cpu is not None else (0.0, 0.0, 0.0)
        gbusy0, gsteal0, _ = cpu_times(gen_cpu) if gen_cpu is not None else (0.0, 0.0, 0.0)
        rss0 = tree_rss_kib(peer.pid) if peer is not None else 0
        peak = [rss0]
        sampling = threading.Event()

        def sample_rss() -> None:
            assert peer is not None
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], tree_rss_kib(peer.pid))

        sampler = threading.Thread(target=sample_rss, daemon=True) \
            if load.rss and peer is not None else None
        lg.stdin.write(b"go\n")
        lg.stdin.flush()
        if sampler is not None:
            sampler.start()
        line = lg.stdout.readline()
        sampling.set()
        if sampler is not None:
            sampler.join()
        busy1, steal1, _ = cpu_times(proxy_cpu) if proxy_cpu is not None else (0.0, 0.0, 0.0)
        gbusy1, gsteal1, _ = cpu_times(gen_cpu) if gen_cpu is not None else (0.0, 0.0, 0.0)
        lg.wait()
        cpu_mid, up_mid = _tree_cpu(peer), tree_cpu_seconds(upstream.pid)
        if peer is not None:
            _settle(peer.pid)
        cpu1, up1 = _tree_cpu(peer), tree_cpu_seconds(upstream.pid)
    finally:
        if lg.poll() is None:
            lg.kill()
            lg.wait()
        lg.stdin.close()
        lg.stdout.close()
    if not line:
        raise SystemExit(f"loadgen gave no result; see {log}")
    out = json.loads(line)
    if peer is not None and peer.p.poll() is not None:
        out["errors"].append(f"{peer.name} exited ({peer.p.returncode})")
    return Result(
        peer=name, scenario=scenario, repeat=repeat, streams=load.streams,
        events=out["events"], cpu_s=cpu1 - cpu0, wall_s=out["wall_s"],
        gen_cpu_s=(up1 - up0) + out["cpu_s"],
        other_cpu_s=max(0.0, (busy1 - busy0) + (steal1 - steal0) - (cpu_mid - cpu0))
        if proxy_cpu is not None else float("nan"),
        gen_other_cpu_s=max(0.0, (gbusy1 - gbusy0) + (gsteal1 - gsteal0) - (up_mid - up0)
                            - out["cpu_s"]) if gen_cpu is not None else float("nan"),
        lat_p50_ms=out.get("ttfb_p50_ms" if load.sequential else "lat_p50_ms"),
        lat_p99_ms=out.get("ttfb_p99_ms" if load.sequential else "lat_p99_ms"),
        errors=out["errors"], offered=load.offered,
        rss_kib_per_stream=(peak[0] - rss0) / load.streams
        if load.rss and peer is not None else None,
    )


# -- drain ------------------------------------------------------------------------------------

@dataclass
class DrainResult:
    peer: str
    repeat: int
    streams: int  # opened by the load client
    live: int  # of those, live (status 200 and a whole event received) at SIGTERM
    drain_timeout: float
    exit_code: int | None  # None: had to be killed
    exit_s: float | None  # SIGTERM to process exit
    #: SIGTERM to the last terminal record's ``ended_at`` (the journal's wall clock): the rest
    #: of ``exit_s`` is the process winding down after every record was persisted
    last_record_s: float | None
    open_s: float | None  # time to get every stream live
    endings: dict[str, int]  # how the client saw its streams end (loadgen.py --drain)
    refused: int  # opens refused with 503 (keepstream under load) and retried by the client
    journal: bool  # False: the peer has no journal to check (keepstream-none)
    records: int | None = None
    terminal: int | None = None
    exact: int | None = None  # records whose body is a byte-exact prefix of the upstream's
    missing: int | None = None  # client streams without a record
    statuses: dict[str, int] | None = None
    client_bytes: int = 0
    journal_bytes: int | None = None
    errors: list[str] = field(default_factory=list)


def _journal_file(argv: list[str]) -> Path | None:
    """The SQLite file of a keepstream command line's ``--journal``, else None."""
    if "--journal" in argv:
        url = argv[argv.index("--journal") + 1]
        if url.startswith("sqlite:///"):
            return Path(url[len("sqlite:///"):])
    return None


def _wait_exit(p: subprocess.Popen[bytes], limit: float) -> tuple[int | None, float]:
    """Wait (precisely: a pidfd, not a polling loop) up to ``limit`` s for ``p`` to exit:
    (returncode or None, monotonic time it exited or gave up)."""
    fd = os.pidfd_open(p.pid)
    try:
        ready, _, _ = select.select([fd], [], [], limit)
        t = time.monotonic()
    finally:
        os.close(fd)
    if not ready:
        return None, t
    return p.wait(), t


def check_journal(path: Path, detail: list[dict[str, Any]], d: DrainResult,
                  sigterm_wall: float) -> None:
    """Read the journal (read-only, after the exit) into ``d``: every record terminal, its body
    contiguous, as long as its ``bytes`` column, a byte-exact prefix of the upstream's body and
    no shorter than what its client received; every live client stream has a record. (Opens
    refused with 503 leave records too: terminal, with no body.)"""
    if not path.exists():
        d.errors.append(f"no journal at {path}")
        return
    client = {str(c["id"]): c for c in detail if c.get("id")}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT id, status, bytes, ended_at FROM streams").fetchall()
        # A body's recent small pieces may still be in ``tail`` (keepstream folds it into
        # ``chunks`` as it goes and at close; journals before 2026-12-07 have no such table).
        has_tail = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'tail'").fetchone()
        body_sql = "SELECT offset, data FROM chunks WHERE stream_id = ?1" + (
            " UNION ALL SELECT offset, data FROM tail WHERE stream_id = ?1" if has_tail else ""
        ) + " ORDER BY offset"
        d.records, d.terminal, d.exact, d.journal_bytes, d.statuses = len(rows), 0, 0, 0, {}
        ended = [r[3] for r in rows if r[3] is not None]
        d.last_record_s = max(ended) - sigterm_wall if ended else None
        bad: list[str] = []
        for sid, status, nbytes, _ in rows:
            d.statuses[status] = d.statuses.get(status, 0) + 1
            d.terminal += status != "open"
            body = bytearray()
            for offset, data in con.execute(body_sql, (sid,)):
                if offset != len(body):
                    bad.append(f"{sid}: chunk at {offset}, want {len(body)}")
                    break
                body += data
            d.journal_bytes += len(body)
            c = client.get(sid)
            why = None
            if len(body) != nbytes:
                why = f"body {len(body)} bytes, bytes column {nbytes}"
            elif not is_upstream_prefix(body):
                why = "body is not a prefix of the upstream's bytes"
            elif c is not None and c["bytes"] > len(body):
                why = f"client received {c['bytes']} bytes, journal has {len(body)}"
            elif c is not None and isinstance(c.get("reconnect"), dict):
                rc = c["reconnect"]
                if rc.get("keepstream_id") != sid or rc.get("status") != status:
                    why = f"reconnect event {rc} does not match the record ({status})"
            if why:
                bad.append(f"{sid}: {why}")
            else:
                d.exact += 1
    finally:
        con.close()
    ids = {r[0] for r in rows}
    d.missing = sum(1 for c in detail if c["live"] and c.get("id") not in ids)
    if d.terminal != d.records:
        d.errors.append(f"{d.records - d.terminal} record(s) not terminal: {d.statuses}")
    if bad:
        d.errors.append(f"{len(bad)} record(s) not byte-exact, e.g. {bad[:2]}")
    if d.missing:
        d.errors.append(f"{d.missing} live client stream(s) without a record")


def run_drain(name: str, up_url: str, args: argparse.Namespace, work: Path,
              proxy_cpu: int | None, gen_cpu: int | None, repeat: int, log: Path) -> DrainResult:
    """A fresh keepstream (its own journal), ``--drain-streams`` live streams, SIGTERM."""
    base, _, src = name.partition("@")
    load = SCENARIOS["drain"].load(args)
    port = _free_port()
    safe = name.replace("/", "_")
    make_argv = PEERS[base].argv
    assert make_argv is not None  # drain peers are keepstream command lines
    argv = make_argv(f"127.0.0.1:{port}", up_url, work / f"drain-{safe}-{repeat}")
    argv += ["--drain-timeout", f"{args.drain_timeout:g}"]
    journal = _journal_file(argv)
    d = DrainResult(peer=name, repeat=repeat, streams=load.streams, live=0,
                    drain_timeout=args.drain_timeout, exit_code=None, exit_s=None,
                    last_record_s=None, open_s=None, endings={}, refused=0,
                    journal=journal is not None)
    proc = Proc(f"{name} (drain)", argv, work / f"{safe}-drain-{repeat}.log", proxy_cpu,
                env=_peer_env(src))
    lg = None
    out: dict[str, Any] = {}
    try:
        _wait_port(proc, port)
        open_timeout = load.timeout  # to get every stream live
        with log.open("ab") as errf:
            lg = subprocess.Popen(
                [PY, str(HERE / "loadgen.py"), "--drain", "--target", f"127.0.0.1:{port}",
                 "--path", load.path, "--streams", str(load.streams),
                 "--open-timeout", f"{open_timeout:g}",
                 "--timeout", f"{open_timeout + args.drain_timeout + 60:g}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                preexec_fn=_pinned(gen_cpu), cwd=HERE.parent)
        assert lg.stdout is not None
        first = lg.stdout.readline().split()
        if len(first) != 2 or first[0] != b"OPEN":
            d.errors.append(f"loadgen --drain failed to open its streams; see {log}")
            return d
        t0, sigterm_wall = time.monotonic(), time.time()
        proc.p.send_signal(signal.SIGTERM)
        d.exit_code, t1 = _wait_exit(proc.p, args.drain_timeout + 30)
        d.exit_s = t1 - t0 if d.exit_code is not None else None
        if d.exit_code is None:
            d.errors.append(f"{name} did not exit within {args.drain_timeout + 30:g} s of "
                            "SIGTERM: killed")
            proc.p.kill()
            proc.p.wait()
        line = lg.stdout.readline()
        lg.wait()
        if not line:
            d.errors.append(f"loadgen --drain gave no result; see {log}")
            return d
        out = json.loads(line)
    finally:
        if lg is not None:
            if lg.poll() is None:
                lg.kill()
                lg.wait()
            if lg.stdout is not None:
                lg.stdout.close()
        proc.stop()
    detail: list[dict[str, Any]] = out["detail"]
    d.live, d.open_s, d.endings = out["live"], out["open_s"], out["endings"]
    d.refused = out["refused"]
    d.client_bytes = sum(c["bytes"] for c in detail)
    d.errors += out["errors"]
    if d.live != d.streams:
        d.errors.append(f"only {d.live} of {d.streams} streams were live at SIGTERM")
    if journal is not None:
        check_journal(journal, detail, d, sigterm_wall)
    return d


# -- report -----------------------------------------------------------------------------------

@dataclass
class Row:
    peer: str
    scenario: str
    streams: int
    events: int
    cpu_us: float
    cpu_lo: float
    cpu_hi: float
    ratio: float | None
    events_per_s: float
    proxy_cpu_pct: float
    gen_cpu_pct: float
    other_pct: float
    gen_other_pct: float
    p50: float | None
    p99: float | None
    offered: float | None
    failed_runs: int
    rss_kib_per_stream: float | None = None


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(results: list[Result], peers: list[str], scenarios: list[str]) -> list[Row]:
    rows: list[Row] = []
    for sc in scenarios:
        base = [r.cpu_us_per_event for r in results if r.scenario == sc and r.peer == BASELINE]
        base_med = _median(base) if base else None
        for peer in peers:
            rs = [r for r in results if r.scenario == sc and r.peer == peer]
            if not rs:
                continue
            cpu = [r.cpu_us_per_event for r in rs]
            p50 = [r.lat_p50_ms for r in rs if r.lat_p50_ms is not None]
            p99 = [r.lat_p99_ms for r in rs if r.lat_p99_ms is not None]
            med = _median(cpu)
            rows.append(Row(
                peer=peer, scenario=sc, streams=rs[0].streams, events=rs[0].events,
                cpu_us=med, cpu_lo=min(cpu), cpu_hi=max(cpu),
                ratio=med / base_med if base_med and peer != DIRECT else None,
                events_per_s=_median([r.events_per_s for r in rs]),
                proxy_cpu_pct=_median([100 * r.cpu_s / r.wall_s for r in rs]),
                gen_cpu_pct=_median([100 * r.gen_cpu_s / r.wall_s for r in rs]),
                other_pct=_median([100 * r.other_cpu_s / r.wall_s for r in rs]),
                gen_other_pct=_median([100 * r.gen_other_cpu_s / r.wall_s for r in rs]),
                p50=_median(p50) if p50 else None, p99=_median(p99) if p99 else None,
                offered=rs[0].offered, failed_runs=sum(1 for r in rs if r.errors),
                # The largest, not the median: a later repeat on the same process reuses
                # the heap the first one grew and reads a fraction of what a stream holds.
                rss_kib_per_stream=max([r.rss_kib_per_stream for r in rs
                                        if r.rss_kib_per_stream is not None])
                if any(r.rss_kib_per_stream is not None for r in rs) else None,
            ))
    return rows


def _align(head: list[str], body: list[list[str]], left: int = 2) -> str:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in
                               enumerate(zip(line, widths, strict=True)))
                     for line in [head, *body])


def format_table(rows: list[Row]) -> str:
    head = ["proxy", "scenario", "streams", "events", "cpu_us/event", "(min-max)",
            f"vs {BASELINE}", "events/s", "proxy cpu%", "other%", "gen cpu%", "p50 ms",
            "p99 ms", "rss KiB/stream"]
    body = [[
        r.peer, r.scenario, str(r.streams), str(r.events), f"{r.cpu_us:.1f}",
        f"{r.cpu_lo:.1f}-{r.cpu_hi:.1f}", f"{r.ratio:.2f}" if r.ratio is not None else "-",
        f"{r.events_per_s:,.0f}", f"{r.proxy_cpu_pct:.0f}", f"{r.other_pct:.0f}",
        f"{r.gen_cpu_pct:.0f}",
        f"{r.p50:.2f}" if r.p50 is not None else "-",
        f"{r.p99:.2f}" if r.p99 is not None else "-",
        f"{r.rss_kib_per_stream:.1f}" if r.rss_kib_per_stream is not None else "-",
    ] for r in rows]
    return _align(head, body)


def _opt(v: object) -> str:
    return "-" if v is None else str(v)


def format_drain(drains: list[DrainResult]) -> str:
    head = ["proxy", "run", "streams", "live", "records", "terminal", "byte-exact", "missing",
            "client endings", "exit code", "exit s", "last record s", "drain_timeout",
            "open s", "refused", "journal KiB"]
    body = [[
        d.peer, str(d.repeat + 1), str(d.streams), str(d.live), _opt(d.records),
        _opt(d.terminal), _opt(d.exact), _opt(d.missing),
        " ".join(f"{k} {v}" for k, v in sorted(d.endings.items())) or "-",
        _opt(d.exit_code), f"{d.exit_s:.2f}" if d.exit_s is not None else "-",
        f"{d.last_record_s:.2f}" if d.last_record_s is not None else "-",
        f"{d.drain_timeout:g}", f"{d.open_s:.1f}" if d.open_s is not None else "-",
        str(d.refused),
        f"{d.journal_bytes / 1024:,.0f}" if d.journal_bytes is not None else "-",
    ] for d in drains]
    return _align(head, body, left=1)


def _row(rows: list[Row], scenario: str, peer: str) -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.peer == peer), None)


#: Scenarios whose p50/p99 are per-event latencies (upstream write to client read): there,
#: every peer's latency minus ``direct``'s is its added latency.
LATENCY_SCENARIOS = ("paced",)


def added_latency(rows: list[Row]) -> dict[str, dict[str, tuple[float, float]]]:
    """{scenario: {peer: (added p50 ms, added p99 ms)}}: each peer's median p50/p99 minus
    ``direct``'s of the same run."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for sc in LATENCY_SCENARIOS:
        d = _row(rows, sc, DIRECT)
        if d is None or d.p50 is None or d.p99 is None:
            continue
        out[sc] = {r.peer: (r.p50 - d.p50, r.p99 - d.p99) for r in rows
                   if r.scenario == sc and r.peer != DIRECT and r.p50 is not None
                   and r.p99 is not None}
    return out


def ratio_lines(rows: list[Row], subject: str = SUBJECT) -> list[str]:
    """``subject``'s CPU per event over every other peer's, per scenario (same run), and every
    peer's added latency over ``direct`` (``subject`` first)."""
    out = []
    for sc in dict.fromkeys(r.scenario for r in rows):
        mine = _row(rows, sc, subject)
        if mine is None:
            continue
        parts = [f"{r.peer} {mine.cpu_us / r.cpu_us:.2f}x" for r in rows
                 if r.scenario == sc and r.peer != subject and r.cpu_us > 0]
        if parts:
            out.append(f"{subject} cpu/event vs each peer, {sc}: " + ", ".join(parts))
    for sc, per_peer in added_latency(rows).items():
        order = sorted(per_peer, key=lambda p: p != subject)
        if subject in per_peer:
            p50, p99 = per_peer[subject]
            out.append(f"{subject} added latency over {DIRECT}, {sc}: p50 {p50:.2f} ms, "
                       f"p99 {p99:.2f} ms")
        out.append(f"added latency over {DIRECT}, {sc} (p50 / p99 ms): " + ", ".join(
            f"{p} {per_peer[p][0]:.2f} / {per_peer[p][1]:.2f}" for p in order))
    return out


# -- targets ----------------------------------------------------------------------------------

Verdict = tuple[str, bool] | None  # (figure and limit as text, met); None: not measured


@dataclass(frozen=True)
class Target:
    """One acceptance criterion for ``SUBJECT``: ``test(subject_row, peer_rows, drains)``.
    ``peers`` must be in the run (else the target is skipped with a note); a target whose
    scenario did not run is left out silently."""

    scenario: str
    issue: int
    peers: tuple[str, ...]
    test: Callable[[Row | None, dict[str, Row], list[DrainResult]], Verdict]


def _vs_minimal(limit: float) -> Callable[[Row | None, dict[str, Row], list[DrainResult]],
                                          Verdict]:
    def test(s: Row | None, p: dict[str, Row], _: list[DrainResult]) -> Verdict:
        if s is None or not p[BASELINE].cpu_us > 0:
            return None
        ratio = s.cpu_us / p[BASELINE].cpu_us
        return f"cpu/event {ratio:.2f}x {BASELINE} (limit {limit:g}x)", ratio <= limit
    return test


def _cpu_limit(limit: float, unit: str, strict: bool = False
               ) -> Callable[[Row | None, dict[str, Row], list[DrainResult]], Verdict]:
    def test(s: Row | None, _: dict[str, Row], __: list[DrainResult]) -> Verdict:
        if s is None:
            return None
        hit = s.cpu_us < limit if strict else s.cpu_us <= limit
        return f"cpu {s.cpu_us:,.1f} us/{unit} (limit {'<' if strict else '<='} {limit:g})", hit
    return test


def _cpu_vs_aiohttp(s: Row | None, p: dict[str, Row], _: list[DrainResult]) -> Verdict:
    a = p["aiohttp"].cpu_us
    if s is None or not a > 0:
        return None
    return (f"cpu/event {s.cpu_us:.1f} us, aiohttp {a:.1f} us ({s.cpu_us / a:.2f}x, limit 1x)",
            s.cpu_us <= a)


def _added_p99(s: Row | None, p: dict[str, Row], _: list[DrainResult]) -> Verdict:
    base = p[DIRECT].p99
    if s is None or s.p99 is None or base is None:
        return None
    added = s.p99 - base
    return f"added latency p99 {added:.2f} ms over {DIRECT} (limit < 5 ms)", added < 5.0


def _idle_rss(s: Row | None, _: dict[str, Row], __: list[DrainResult]) -> Verdict:
    if s is None or s.rss_kib_per_stream is None:
        return None
    return (f"rss {s.rss_kib_per_stream:.1f} KiB per open stream (limit <= 20)",
            s.rss_kib_per_stream <= 20.0)


def _ttfb_p50(s: Row | None, p: dict[str, Row], _: list[DrainResult]) -> Verdict:
    a = p["aiohttp"].p50
    if s is None or s.p50 is None or a is None:
        return None
    return f"TTFB p50 {s.p50:.2f} ms, aiohttp {a:.2f} ms (limit: no more)", s.p50 <= a


def _drain_ok(_: Row | None, __: dict[str, Row], drains: list[DrainResult]) -> Verdict:
    ds = [d for d in drains if d.peer == SUBJECT]
    if not ds:
        return None
    bad = [d for d in ds if d.errors or d.exit_code != 0 or d.exit_s is None
           or d.exit_s > d.drain_timeout + 1.0]
    worst = max((d.exit_s for d in ds if d.exit_s is not None), default=float("nan"))
    return (f"{len(ds) - len(bad)} of {len(ds)} run(s) with every record terminal and "
            f"byte-exact and exit 0 within drain_timeout + 1 s (slowest exit {worst:.2f} s, "
            f"drain_timeout {ds[0].drain_timeout:g} s)", not bad)


TARGETS = [
    # issue 2
    Target("bulk", 2, (BASELINE,), _vs_minimal(0.5)),
    Target("paced", 2, (BASELINE,), _vs_minimal(1.0)),
    # issue 8 (journal SQLite, one worker, same run as the peers)
    Target("bulk", 8, (), _cpu_limit(2.0, "event")),
    Target("paced", 8, ("aiohttp",), _cpu_vs_aiohttp),
    Target("paced", 8, (DIRECT,), _added_p99),
    Target("idle", 8, (), _idle_rss),
    Target("idle", 8, ("aiohttp",), _cpu_vs_aiohttp),
    Target("ttfb", 8, ("aiohttp",), _ttfb_p50),
    Target("ttfb", 8, (), _cpu_limit(600.0, "request", strict=True)),
    Target("drain", 8, (), _drain_ok),
]


def caveats(rows: list[Row], proxy_cpu: int | None) -> list[str]:
    """What makes a row's figure less trustworthy: a busy machine, a saturated proxy."""
    out = []
    for r in rows:
        what = f"{r.peer} {r.scenario}"
        if r.other_pct > 15:
            out.append(f"note: {what}: CPU {proxy_cpu} spent {r.other_pct:.0f}% of the time on "
                       "other processes (or steal): a noisy machine, figures unreliable")
        if r.gen_other_pct > 25:
            out.append(f"note: {what}: the load generator's CPU spent {r.gen_other_pct:.0f}% of "
                       "the time on other processes: pacing and latency figures suffer")
        if r.offered and r.events_per_s < 0.95 * r.offered:
            out.append(f"note: {what}: delivered {r.events_per_s:,.0f} of {r.offered:,.0f} "
                       "offered events/s: the proxy was saturated, so the run measured a "
                       "backlog (more events per read and per send), not the paced regime")
        if r.failed_runs:
            out.append(f"note: {what}: {r.failed_runs} run(s) lost events (see above)")
    return out


def check_targets(rows: list[Row], drains: list[DrainResult], scenarios: list[str]
                  ) -> tuple[list[dict[str, Any]], bool]:
    """Every target of a scenario that ran: met, MISSED, or skipped (a peer not in the run)."""
    out: list[dict[str, Any]] = []
    ok = True
    for t in TARGETS:
        if t.scenario not in scenarios:
            continue
        if t.scenario == "drain":
            subject = None
            have = any(d.peer == SUBJECT for d in drains)
        else:
            subject = _row(rows, t.scenario, SUBJECT)
            have = subject is not None
        peers = {p: r for p in t.peers if (r := _row(rows, t.scenario, p)) is not None}
        missing = ([] if have else [SUBJECT]) + [p for p in t.peers if p not in peers]
        if missing:
            out.append({"scenario": t.scenario, "issue": t.issue, "status": "skipped",
                        "text": f"{', '.join(missing)} not in this run"})
            continue
        verdict = t.test(subject, peers, drains)
        if verdict is None:
            out.append({"scenario": t.scenario, "issue": t.issue, "status": "skipped",
                        "text": "figure not measured in this run"})
            continue
        text, hit = verdict
        ok &= hit
        out.append({"scenario": t.scenario, "issue": t.issue,
                    "status": "met" if hit else "MISSED", "text": text})
    return out, ok


def format_targets(targets: list[dict[str, Any]]) -> list[str]:
    return [f"note: target {t['scenario']} (issue {t['issue']}) skipped: {t['text']}"
            if t["status"] == "skipped" else
            f"target {t['scenario']} (issue {t['issue']}): {SUBJECT} {t['text']}: {t['status']}"
            for t in targets]


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help=f"comma-separated, from: {', '.join(PEERS)}; NAME@DIR runs a peer "
                        "with PYTHONPATH=DIR (A/B a patched keepstream source tree: "
                        "keepstream-sqlite@/tmp/patched/src)")
    p.add_argument("--streams", type=int, default=None,
                   help="concurrent streams (default: 50 bulk, 200 paced)")
    p.add_argument("--events", type=int, default=20000, help="bulk: events per stream")
    p.add_argument("--bulk-batch", type=int, default=64,
                   help="bulk: events (one HTTP chunk each) per upstream write() (default 64; "
                        "1 is the per-event write of the runs before 2026-12-02's last)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="paced and idle: seconds per stream")
    p.add_argument("--rate", type=float, default=50.0, help="paced: events/s per stream")
    p.add_argument("--requests", type=int, default=500, help="ttfb: sequential requests")
    p.add_argument("--idle-streams", type=int, default=2000, help="idle: open streams")
    p.add_argument("--drain-streams", type=int, default=1000,
                   help="drain: live streams at SIGTERM")
    p.add_argument("--drain-timeout", type=float, default=2.0,
                   help="drain: keepstream's --drain-timeout (the exit must come within it "
                        "+ 1 s)")
    p.add_argument("--repeat", type=int, default=3, help="runs per peer and scenario (median)")
    p.add_argument("--subject", default=SUBJECT,
                   help=f"the peer the ratio lines and the targets are about (default {SUBJECT}; "
                        "keepstream-lean for the lean engine)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for CI: 4 streams, few events, a 20-stream drain, 1 repeat; "
                        "fails only if a peer loses or garbles events or a drain loses a "
                        "record")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--json", metavar="PATH", help="also write every run's raw figures here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, journal)")
    args = p.parse_args(argv)
    args.bulk_streams, args.paced_streams = 50, 200
    if args.smoke:
        args.streams, args.events, args.duration, args.repeat = 4, 200, 0.4, 1
        args.requests = 10
        args.idle_streams = 20
        args.drain_streams, args.drain_timeout = 20, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    global SUBJECT
    args = parse_args(argv)
    SUBJECT = args.subject
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p.partition("@")[0] not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
    for p in list(peers):
        peer = PEERS[p.partition("@")[0]]
        gone = peer.missing()
        if gone:
            how = f"install {peer.program}" if peer.program else "pip install -e '.[bench]'"
            print(f"note: peer {p} skipped: {', '.join(gone)} not installed ({how})",
                  flush=True)
            peers.remove(p)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    drain_peers = [n for n in peers if PEERS[n.partition("@")[0]].keepstream]
    if "drain" in scenarios and len(drain_peers) < len(peers):
        print(f"note: drain: only keepstream peers take part; skipped: "
              f"{', '.join(n for n in peers if n not in drain_peers)}", flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu = gen_cpu = None
    if not args.no_pin and len(cpus) >= 2:
        proxy_cpu, gen_cpu = cpus[0], cpus[1]
        os.sched_setaffinity(0, {gen_cpu})
    work = Path(tempfile.mkdtemp(prefix="keepstream-bench-"))
    print(f"keepstream benchmark: peers {', '.join(peers)}; scenarios {', '.join(scenarios)}; "
          f"{args.repeat} repeat(s); proxy on CPU {proxy_cpu}, load on CPU {gen_cpu}; "
          f"logs in {work}", flush=True)
    procs: list[Proc] = []
    results: list[Result] = []
    drains: list[DrainResult] = []
    try:
        upstream = Proc("upstream", [PY, str(HERE / "upstream.py")], work / "upstream.log",
                        gen_cpu, stdout_pipe=True)
        procs.append(upstream)
        assert upstream.p.stdout is not None
        first = upstream.p.stdout.readline().split()
        if len(first) != 2 or first[0] != b"PORT":
            raise SystemExit(f"upstream failed to start:\n{upstream.tail()}")
        up_port = int(first[1])
        up_url = f"http://127.0.0.1:{up_port}"
        # Long-running peers for the load scenarios; ``direct`` has no process (None).
        running: dict[str, tuple[Proc | None, int]] = {}
        if any(not SCENARIOS[sc].drain for sc in scenarios):
            for name in peers:
                base, _, src = name.partition("@")
                make_argv = PEERS[base].argv
                if make_argv is None:
                    running[name] = (None, up_port)
                    continue
                port = _free_port()
                proc = Proc(name, make_argv(f"127.0.0.1:{port}", up_url, work / f"{port}"),
                            work / f"{name.replace('/', '_')}.log", proxy_cpu,
                            env=_peer_env(src))
                procs.append(proc)
                running[name] = (proc, port)
        for proc_or_none, port in running.values():
            if proc_or_none is not None:
                _wait_port(proc_or_none, port)
        log = work / "loadgen.log"
        for sc in scenarios:
            scen = SCENARIOS[sc]
            if scen.drain:
                for rep in range(args.repeat):
                    k = rep % len(drain_peers) if drain_peers else 0
                    for name in drain_peers[k:] + drain_peers[:k]:
                        d = run_drain(name, up_url, args, work, proxy_cpu, gen_cpu, rep, log)
                        drains.append(d)
                        status = "ok" if not d.errors else f"ERRORS {d.errors}"
                        exit_s = f"{d.exit_s:.2f} s" if d.exit_s is not None else "-"
                        print(f"  {sc:6} #{rep + 1} {name:18} {d.live}/{d.streams} live; "
                              f"records {_opt(d.records)}, terminal {_opt(d.terminal)}, "
                              f"byte-exact {_opt(d.exact)}; exit {_opt(d.exit_code)} after "
                              f"{exit_s} (drain_timeout {d.drain_timeout:g} s) {status}",
                              flush=True)
                continue
            assert scen.warmup is not None
            # warm-up: imports, code paths, upstream connection pools (timing only: the smoke
            # run, which claims no timing, skips it)
            for name in [] if args.smoke else peers:
                proc, port = running[name]
                w = run_load(name, proc, port, upstream, scen.warmup(args), gen_cpu,
                             proxy_cpu, sc, -1, log)
                if w.errors:
                    raise SystemExit(f"{name} failed the {sc} warm-up: {w.errors}\n"
                                     f"{proc.tail() if proc is not None else ''}")
            load = scen.load(args)
            for rep in range(args.repeat):
                k = rep % len(peers)
                for name in peers[k:] + peers[:k]:
                    proc, port = running[name]
                    r = run_load(name, proc, port, upstream, load, gen_cpu, proxy_cpu, sc,
                                 rep, log)
                    results.append(r)
                    status = "ok" if not r.errors else f"ERRORS {r.errors}"
                    print(f"  {sc:6} #{rep + 1} {name:18} {r.events:>8} events "
                          f"{r.cpu_us_per_event:8.1f} us/event {r.events_per_s:>10,.0f} ev/s "
                          f"{status}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    rows = summarize(results, peers, scenarios)
    if rows:
        print()
        print(format_table(rows))
    for line in ratio_lines(rows, SUBJECT):
        print(line)
    if drains:
        print()
        print(format_drain(drains))
    notes = [] if args.smoke else caveats(rows, proxy_cpu)
    if notes:
        print()
        print("\n".join(notes))
    failed = [r for r in results if r.errors]
    failed_drains = [d for d in drains if d.errors]
    targets, ok = ([], True) if args.smoke else check_targets(rows, drains, scenarios)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": len(os.sched_getaffinity(0)),
            "args": {k: v for k, v in vars(args).items()},
            "runs": [{**vars(r), "cpu_us_per_event": r.cpu_us_per_event,
                      "events_per_s": r.events_per_s} for r in results],
            "summary": [asdict(r) for r in rows],
            "added_latency_ms": {sc: {p: {"p50": v[0], "p99": v[1]} for p, v in per.items()}
                                 for sc, per in added_latency(rows).items()},
            "drain": [asdict(d) for d in drains],
            "targets": targets,
        }, indent=2))
    if not args.keep and not failed and not failed_drains:
        shutil.rmtree(work, ignore_errors=True)
    # The targets first: a peer that lost events (the minimal relay at 2,000 idle streams)
    # fails the run, and should not hide the subject's figures.
    lines = format_targets(targets)
    if lines:
        print()
        print("\n".join(lines))
    if failed or failed_drains:
        if failed:
            print(f"\n{len(failed)} run(s) lost or garbled events; logs kept in {work}")
        if failed_drains:
            print(f"\n{len(failed_drains)} drain run(s) lost a record or an event (see "
                  f"ERRORS above); logs and journals kept in {work}")
        return 1
    if args.smoke:
        print("\nsmoke run: every peer forwarded every event intact (timings not meaningful)")
        if drains:
            print("smoke drain: every record terminal and byte-exact, every client stream's "
                  "bytes within its record")
        return 0
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
