"""keepstream's CPU cost per forwarded event, side by side with peers, in one run.

    python benchmarks/run.py                  # bulk + paced, 3 repeats, a few minutes
    python benchmarks/run.py --smoke          # tiny CI-sized run: checks that every peer
                                              # forwards every event; no timing claims

What runs (docs/performance.md explains it in full):

* ``upstream.py``: a raw-socket SSE origin, 100-byte events, one HTTP chunk (and one ``send()``)
  per event, either as fast as the socket takes them (bulk) or at a fixed rate (paced).
* each peer (proxy under test) as its own process, started once and reused for every run;
  peers are measured in turn, rotating the order on each repeat.
* ``loadgen.py``: the load client, N concurrent streams over raw sockets, checking every event.

The proxy is pinned to the first allowed CPU, the upstream, the load client and this script to
the second (when there are two). The proxy's CPU time is read from ``/proc/<pid>/stat``
(user + system, the whole process tree) right before the load starts and once the proxy has gone
quiet after it ended; ``cpu_us/event = cpu_seconds * 1e6 / events delivered``. Each figure is the
median over ``--repeat`` runs.

To add a peer, add an entry to ``PEERS``; to add a scenario, an entry to ``SCENARIOS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _bench import cpu_times, tree_cpu_seconds, tree_rss_kib

HERE = Path(__file__).resolve().parent
PY = sys.executable


# -- peers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str
    describe: str
    #: (bind, upstream_url, state) -> argv; ``state`` is a path prefix unique to this peer
    argv: Callable[[str, str, Path], list[str]]
    #: Python modules the peer needs (``pip install -e '.[bench]'``); missing: peer skipped
    requires: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("keepstream-sqlite", "keepstream serve, journal sqlite (WAL, synchronous=NORMAL)",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--journal",
                                    f"sqlite:///{tmp}-journal.db"]),
        Peer("keepstream-none", "keepstream serve, journal none",
             lambda bind, up, tmp: [PY, "-m", "keepstream", "serve", "--bind", bind,
                                    "--upstream", up, "--journal", "none"]),
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
    ]
}
BASELINE = "minimal"
DEFAULT_PEERS = ["keepstream-sqlite", "keepstream-none", "minimal", "aiohttp", "starlette"]


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
    warmup: Callable[[argparse.Namespace], Load]


def _bulk(streams: int, events: int) -> Load:
    return Load(streams, events, f"/bulk?events={events}", False,
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


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "bulk", "upstream writes as fast as it can",
            lambda a: _bulk(a.streams or a.bulk_streams, a.events),
            lambda a: _bulk(a.streams or a.bulk_streams, max(1, min(a.events, 100))),
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
    ]
}


# -- processes --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def run_load(peer: Proc, port: int, upstream: Proc, load: Load, gen_cpu: int | None,
             proxy_cpu: int | None, scenario: str, repeat: int, log: Path) -> Result:
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
        _settle(peer.pid)
        cpu0, up0 = tree_cpu_seconds(peer.pid), tree_cpu_seconds(upstream.pid)
        busy0, steal0, _ = cpu_times(proxy_cpu) if proxy_cpu is not None else (0.0, 0.0, 0.0)
        gbusy0, gsteal0, _ = cpu_times(gen_cpu) if gen_cpu is not None else (0.0, 0.0, 0.0)
        rss0 = tree_rss_kib(peer.pid)
        peak = [rss0]
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], tree_rss_kib(peer.pid))

        sampler = threading.Thread(target=sample_rss, daemon=True) if load.rss else None
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
        cpu_mid, up_mid = tree_cpu_seconds(peer.pid), tree_cpu_seconds(upstream.pid)
        _settle(peer.pid)
        cpu1, up1 = tree_cpu_seconds(peer.pid), tree_cpu_seconds(upstream.pid)
    finally:
        if lg.poll() is None:
            lg.kill()
            lg.wait()
        lg.stdin.close()
        lg.stdout.close()
    if not line:
        raise SystemExit(f"loadgen gave no result; see {log}")
    out = json.loads(line)
    if peer.p.poll() is not None:
        out["errors"].append(f"{peer.name} exited ({peer.p.returncode})")
    return Result(
        peer=peer.name, scenario=scenario, repeat=repeat, streams=load.streams,
        events=out["events"], cpu_s=cpu1 - cpu0, wall_s=out["wall_s"],
        gen_cpu_s=(up1 - up0) + out["cpu_s"],
        other_cpu_s=max(0.0, (busy1 - busy0) + (steal1 - steal0) - (cpu_mid - cpu0))
        if proxy_cpu is not None else float("nan"),
        gen_other_cpu_s=max(0.0, (gbusy1 - gbusy0) + (gsteal1 - gsteal0) - (up_mid - up0)
                            - out["cpu_s"]) if gen_cpu is not None else float("nan"),
        lat_p50_ms=out.get("ttfb_p50_ms" if load.sequential else "lat_p50_ms"),
        lat_p99_ms=out.get("ttfb_p99_ms" if load.sequential else "lat_p99_ms"),
        errors=out["errors"], offered=load.offered,
        rss_kib_per_stream=(peak[0] - rss0) / load.streams if load.rss else None,
    )


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
                ratio=med / base_med if base_med else None,
                events_per_s=_median([r.events_per_s for r in rs]),
                proxy_cpu_pct=_median([100 * r.cpu_s / r.wall_s for r in rs]),
                gen_cpu_pct=_median([100 * r.gen_cpu_s / r.wall_s for r in rs]),
                other_pct=_median([100 * r.other_cpu_s / r.wall_s for r in rs]),
                gen_other_pct=_median([100 * r.gen_other_cpu_s / r.wall_s for r in rs]),
                p50=_median(p50) if p50 else None, p99=_median(p99) if p99 else None,
                offered=rs[0].offered, failed_runs=sum(1 for r in rs if r.errors),
                rss_kib_per_stream=_median([r.rss_kib_per_stream for r in rs
                                            if r.rss_kib_per_stream is not None])
                if any(r.rss_kib_per_stream is not None for r in rs) else None,
            ))
    return rows


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
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in
                       enumerate(zip(head, widths, strict=True)))]
    lines += ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                        enumerate(zip(b, widths, strict=True))) for b in body]
    return "\n".join(lines)


def ratio_lines(rows: list[Row], subject: str = "keepstream-sqlite") -> list[str]:
    """``subject``'s CPU per event over every other peer's, per scenario (same run)."""
    out = []
    for sc in dict.fromkeys(r.scenario for r in rows):
        mine = next((r for r in rows if r.scenario == sc and r.peer == subject), None)
        if mine is None:
            continue
        parts = [f"{r.peer} {mine.cpu_us / r.cpu_us:.2f}x" for r in rows
                 if r.scenario == sc and r.peer != subject and r.cpu_us > 0]
        if parts:
            out.append(f"{subject} cpu/event vs each peer, {sc}: " + ", ".join(parts))
    return out


#: (scenario, peer, max ratio vs BASELINE): the targets of the performance issue.
TARGETS = [("bulk", "keepstream-sqlite", 0.5), ("paced", "keepstream-sqlite", 1.0)]


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


def check_targets(rows: list[Row]) -> tuple[list[str], bool]:
    lines, ok = [], True
    for sc, peer, limit in TARGETS:
        row = next((r for r in rows if r.scenario == sc and r.peer == peer), None)
        if row is None or row.ratio is None:
            continue
        hit = row.ratio <= limit
        ok &= hit
        lines.append(f"target {sc}: {peer} at {row.ratio:.2f}x {BASELINE} "
                     f"(limit {limit:g}x): {'met' if hit else 'MISSED'}")
    return lines, ok


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
    p.add_argument("--events", type=int, default=2000, help="bulk: events per stream")
    p.add_argument("--duration", type=float, default=10.0, help="paced: seconds per stream")
    p.add_argument("--rate", type=float, default=50.0, help="paced: events/s per stream")
    p.add_argument("--requests", type=int, default=500, help="ttfb: sequential requests")
    p.add_argument("--idle-streams", type=int, default=2000, help="idle: open streams")
    p.add_argument("--repeat", type=int, default=3, help="runs per peer and scenario (median)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for CI: 4 streams, few events, 1 repeat; fails only if a "
                        "peer loses or garbles events")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p.partition("@")[0] not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
    for p in list(peers):
        gone = PEERS[p.partition("@")[0]].missing()
        if gone:
            print(f"note: peer {p} skipped: {', '.join(gone)} not installed "
                  f"(pip install -e '.[bench]')", flush=True)
            peers.remove(p)
    if shutil.which("nginx") is None:
        print("note: nginx not installed: no nginx peer in this run", flush=True)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
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
    try:
        upstream = Proc("upstream", [PY, str(HERE / "upstream.py")], work / "upstream.log",
                        gen_cpu, stdout_pipe=True)
        procs.append(upstream)
        assert upstream.p.stdout is not None
        first = upstream.p.stdout.readline().split()
        if len(first) != 2 or first[0] != b"PORT":
            raise SystemExit(f"upstream failed to start:\n{upstream.tail()}")
        up_url = f"http://127.0.0.1:{int(first[1])}"
        running: dict[str, tuple[Proc, int]] = {}
        for name in peers:
            port = _free_port()
            base, _, src = name.partition("@")
            proc = Proc(name, PEERS[base].argv(f"127.0.0.1:{port}", up_url, work / f"{port}"),
                        work / f"{name.replace('/', '_')}.log", proxy_cpu,
                        env={**({"PYTHONPATH": src} if src else {}),
                             "KEEPSTREAM_MAX_STREAMS": "20000"})
            procs.append(proc)
            running[name] = (proc, port)
        for proc, port in running.values():
            _wait_port(proc, port)
        log = work / "loadgen.log"
        for sc in scenarios:
            scen = SCENARIOS[sc]
            for name in peers:  # warm-up: imports, code paths, upstream connection pools
                proc, port = running[name]
                w = run_load(proc, port, upstream, scen.warmup(args), gen_cpu, proxy_cpu,
                             sc, -1, log)
                if w.errors:
                    raise SystemExit(f"{name} failed the {sc} warm-up: {w.errors}\n"
                                     f"{proc.tail()}")
            load = scen.load(args)
            for rep in range(args.repeat):
                k = rep % len(peers)
                for name in peers[k:] + peers[:k]:
                    proc, port = running[name]
                    r = run_load(proc, port, upstream, load, gen_cpu, proxy_cpu, sc, rep, log)
                    results.append(r)
                    status = "ok" if not r.errors else f"ERRORS {r.errors}"
                    print(f"  {sc:6} #{rep + 1} {name:18} {r.events:>8} events "
                          f"{r.cpu_us_per_event:8.1f} us/event {r.events_per_s:>10,.0f} ev/s "
                          f"{status}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    rows = summarize(results, peers, scenarios)
    print()
    print(format_table(rows))
    for line in ratio_lines(rows):
        print(line)
    notes = [] if args.smoke else caveats(rows, proxy_cpu)
    if notes:
        print()
        print("\n".join(notes))
    failed = [r for r in results if r.errors]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": len(os.sched_getaffinity(0)),
            "args": {k: v for k, v in vars(args).items()},
            "runs": [{**vars(r), "cpu_us_per_event": r.cpu_us_per_event,
                      "events_per_s": r.events_per_s} for r in results],
        }, indent=2))
    if not args.keep and not failed:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"\n{len(failed)} run(s) lost or garbled events; logs kept in {work}")
        return 1
    if args.smoke:
        print("\nsmoke run: every peer forwarded every event intact (timings not meaningful)")
        return 0
    lines, ok = check_targets(rows)
    if lines:
        print()
        print("\n".join(lines))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
