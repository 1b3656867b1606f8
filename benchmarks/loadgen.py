"""The load client: N concurrent streams over raw trio sockets, each event counted and checked.

Each stream is one connection and one ``GET``; the response is decoded by
``_bench.ResponseReader`` (chunked framing, every 100-byte event's format and sequence number,
optionally its latency from the upstream's embedded timestamp). The streams all start at once.

    python benchmarks/loadgen.py --target 127.0.0.1:8080 --path '/bulk?events=2000' \\
        --streams 50 --expect 2000 [--latency] [--wait-go]

With ``--wait-go`` it prints ``READY`` after start-up and waits for a line on stdin, so the
caller can sample the proxy's CPU right before the load begins. The result is one JSON line on
stdout: ``events``, ``bytes``, ``wall_s`` (first connect to last byte), ``errors``,
``cpu_s`` (this process), ``ttfb_p50_ms``/``ttfb_p99_ms``, and with ``--latency``
``lat_p50_ms``/``lat_p99_ms``/``lat_max_ms``. ``--sequential`` runs the streams one after
another (the time-to-first-byte scenario).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time

import trio
from _bench import EVENT_SIZE, ProtocolError, ResponseReader, pin_to


async def one_stream(host: str, port: int, path: str, expect: int,
                     latencies: list[int] | None, totals: dict[str, int],
                     ttfb: list[float], ends: list[float]) -> None:
    reader = ResponseReader(latencies)
    t0 = time.monotonic()
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
        req = (f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
               "accept: text/event-stream\r\n\r\n").encode()
        await sock.send(req)
        ttfb_seen = False
        recv = sock.recv
        while not reader.done:
            data = await recv(262144)
            if not data:
                reader.eof()
                break
            reader.feed(data)
            if not ttfb_seen and reader.events:
                ttfb_seen = True
                ttfb.append(time.monotonic() - t0)
    ends.append(time.monotonic())
    if reader.events != expect or reader.body_bytes != expect * EVENT_SIZE:
        raise ProtocolError(f"got {reader.events} events / {reader.body_bytes} bytes, "
                            f"want {expect} / {expect * EVENT_SIZE}")
    totals["events"] += reader.events
    totals["bytes"] += reader.body_bytes


async def run(args: argparse.Namespace) -> dict[str, object]:
    host, _, port = args.target.rpartition(":")
    totals = {"events": 0, "bytes": 0}
    errors: list[str] = []
    latencies: list[int] | None = [] if args.latency else None
    ttfb: list[float] = []
    ends: list[float] = []

    async def guarded() -> None:
        try:
            await one_stream(host, int(port), args.path, args.expect, latencies, totals,
                             ttfb, ends)
        except (OSError, ProtocolError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    with trio.move_on_after(args.timeout) as cs:
        if args.sequential:
            for _ in range(args.streams):  # one after another, a new connection each
                await guarded()
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(args.streams):
                    nursery.start_soon(guarded)
    if cs.cancelled_caught:
        errors.append(f"timed out after {args.timeout} s")
    out: dict[str, object] = {**totals, "wall_s": time.monotonic() - t0}
    out["errors"] = errors[:5]
    if ttfb:
        ttfb.sort()
        out["ttfb_p50_ms"] = ttfb[len(ttfb) // 2] * 1e3
        out["ttfb_p99_ms"] = ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1e3
        out["ttfb_max_ms"] = ttfb[-1] * 1e3
        out["first_end_s"] = min(ends) - t0
        out["last_end_s"] = max(ends) - t0
    out["n_errors"] = len(errors)
    if latencies:
        latencies.sort()
        n = len(latencies)
        out["lat_p50_ms"] = latencies[n // 2] / 1e6
        out["lat_p99_ms"] = latencies[min(n - 1, int(n * 0.99))] / 1e6
        out["lat_max_ms"] = latencies[-1] / 1e6
    return out


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", required=True, help="HOST:PORT of the proxy")
    p.add_argument("--path", required=True, help="request target, e.g. /bulk?events=1000")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--expect", type=int, required=True, help="events expected per stream")
    p.add_argument("--latency", action="store_true", help="record per-event latency")
    p.add_argument("--sequential", action="store_true",
                   help="run the streams one after another (time-to-first-byte scenario)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--wait-go", action="store_true", help="print READY, wait for a stdin line")
    args = p.parse_args()
    pin_to(args.cpu)
    if args.wait_go:
        print("READY", flush=True)
        sys.stdin.readline()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    out = trio.run(run, args)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps(out), flush=True)
    sys.exit(1 if out["n_errors"] else 0)


if __name__ == "__main__":
    cli()
