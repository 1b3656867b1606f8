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

``--drain`` (the drain scenario; the path must carry ``ts=0``) opens the streams (at most
``--open-concurrency`` still waiting for their first event at a time; a stream refused with
503 before it was live is retried, up to ``--open-retries`` times), prints ``OPEN <n>`` once
every stream has received a whole event (or failed), and then reads on until every stream has
ended, however it ends: ``reconnect`` (a ``keepstream-reconnect`` SSE event, then a proper end
of body), ``reconnect-cut`` (that event, then no end), ``end`` (a proper end without one) or
``cut`` (the connection closed or reset without an end). Every stream's bytes before the
reconnect event must be a byte-exact prefix of the upstream's deterministic body
(``_bench.upstream_bytes``). The JSON result adds ``live`` (streams live when ``OPEN`` was
printed), ``refused`` (retried 503s),
``open_s``, ``endings`` and ``detail``: per stream its ``keepstream-id`` header, whether it was
live, the bytes it received (the reconnect event excluded), its ending, the reconnect event's
payload and how often it was refused.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import trio
from _bench import EVENT_SIZE, ProtocolError, ResponseReader, is_upstream_prefix, pin_to

RECONNECT = b"event: keepstream-reconnect\n"


async def one_stream(host: str, port: int, path: str, expect: int,
                     latencies: list[int] | None, totals: dict[str, int],
                     ttfb: list[float], ends: list[float]) -> None:
    # A deterministic body (ts=0) without latencies is compared byte for byte, not per event.
    reader = ResponseReader(latencies, exact="ts=0" in path)
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


def split_reconnect(raw: bytes) -> tuple[bytes, dict[str, Any] | None, str | None]:
    """(forwarded bytes, reconnect payload or None, problem or None) of a drained body.

    keepstream ends an interrupted SSE stream with ``[\\n\\n] event: keepstream-reconnect``
    (the blank line only when the upstream's bytes stopped inside an event)."""
    i = raw.find(RECONNECT)
    if i < 0:
        return raw, None, None if is_upstream_prefix(raw) else "bytes differ from the upstream's"
    pre, tail = raw[:i], raw[i:]
    payload: dict[str, Any] | None = None
    for line in tail.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                payload = json.loads(line[6:])
            except ValueError:
                return pre, None, f"bad reconnect payload {line[:200]!r}"
    if payload is None or not tail.endswith(b"\n\n"):
        return pre, None, f"incomplete reconnect event {tail[:200]!r}"
    # The blank line that ends a partial event is not the upstream's. Without it, the bytes
    # end at the last event boundary (the payload's ``offset``); with it, they go past it
    # (``offset`` tells a 98-byte partial event + blank line from a whole event).
    offset = payload.get("offset")
    lead = pre.endswith(b"\n\n") and (len(pre) - 2) % EVENT_SIZE != 0 and \
        is_upstream_prefix(pre[:-2])
    whole = is_upstream_prefix(pre)
    if lead and (not whole or (isinstance(offset, int) and offset < len(pre) - 2)):
        return pre[:-2], payload, None
    if whole:
        return pre, payload, None
    return pre, payload, "bytes before the reconnect event differ from the upstream's"


async def _drain_attempt(host: str, port: int, path: str, reader: ResponseReader,
                         raw: bytearray, rec: dict[str, Any], live: Callable[[], None]) -> str:
    """One connection of a drained stream, read to its end: its ending (``end`` or ``cut``).
    Calls ``live()`` once the stream has a 200 and a whole event."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
        await sock.send((f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
                         "accept: text/event-stream\r\n\r\n").encode())
        while not reader.done:
            try:
                data = await sock.recv(262144)
            except OSError:  # reset: the proxy went away
                return "cut"
            if not data:
                try:
                    reader.eof()
                except ProtocolError:
                    return "cut"
                break
            head_before = reader.status
            reader.feed(data)
            if reader.status and not head_before:
                rec["id"] = reader.headers.get(b"keepstream-id", b"").decode() or None
            if "live_at" not in rec and reader.status == 200 and len(raw) >= EVENT_SIZE:
                rec["live_at"] = time.monotonic()
                live()
    return "end"


async def drain_stream(host: str, port: int, path: str, gate: trio.Semaphore,
                       opened: list[int], all_open: trio.Event, total: int, retries: int,
                       detail: list[dict[str, Any]], errors: list[str]) -> None:
    rec: dict[str, Any] = {"id": None, "bytes": 0, "ending": None, "reconnect": None,
                           "refused": 0}
    detail.append(rec)
    settled = False

    def settle() -> None:  # live, or failed before it got there: let the next one open
        nonlocal settled
        if not settled:
            settled = True
            gate.release()
            opened[0] += 1
            if opened[0] == total:
                all_open.set()

    await gate.acquire()
    try:
        attempt = 0
        while True:
            raw = bytearray()
            reader = ResponseReader(raw=raw)
            try:
                rec["ending"] = await _drain_attempt(host, port, path, reader, raw, rec, settle)
            except ProtocolError:
                # Refused at open (keepstream under load: the record's creation was not
                # durable within persist_timeout): retry, as a client honouring Retry-After.
                if reader.status == 503 and "live_at" not in rec and attempt < retries:
                    attempt += 1
                    rec["refused"] += 1
                    await trio.sleep(0.5)
                    continue
                raise
            break
        if "live_at" not in rec:
            raise ProtocolError(f"stream ended ({rec['ending']}, status {reader.status}) "
                                f"before its first event")
        data, payload, problem = split_reconnect(bytes(raw))
        rec["bytes"] = len(data)
        rec["reconnect"] = payload
        if payload is not None:
            rec["ending"] = "reconnect" if rec["ending"] == "end" else "reconnect-cut"
        if problem:
            raise ProtocolError(problem)
    except (OSError, ProtocolError, ValueError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        errors.append(rec["error"])
        if "live_at" not in rec:
            rec["ending"] = "failed"
    finally:
        settle()


async def run_drain(args: argparse.Namespace) -> dict[str, object]:
    host, _, port = args.target.rpartition(":")
    errors: list[str] = []
    detail: list[dict[str, Any]] = []
    opened = [0]
    all_open = trio.Event()
    gate = trio.Semaphore(args.open_concurrency)
    t0 = time.monotonic()
    open_s = None
    live_at_open = 0
    with trio.move_on_after(args.timeout) as cs:
        async with trio.open_nursery() as nursery:
            for _ in range(args.streams):
                nursery.start_soon(drain_stream, host, int(port), args.path, gate, opened,
                                   all_open, args.streams, args.open_retries, detail, errors)
            with trio.move_on_after(args.open_timeout):
                await all_open.wait()
            open_s = time.monotonic() - t0
            live_at_open = sum(1 for r in detail if "live_at" in r)
            print(f"OPEN {live_at_open}", flush=True)
    if cs.cancelled_caught:
        errors.append(f"timed out after {args.timeout} s")
    endings: dict[str, int] = {}
    for r in detail:
        endings[str(r["ending"])] = endings.get(str(r["ending"]), 0) + 1
    return {"streams": args.streams, "live": live_at_open,
            "refused": sum(r["refused"] for r in detail), "open_s": open_s,
            "wall_s": time.monotonic() - t0, "endings": endings,
            "errors": errors[:5], "n_errors": len(errors),
            "detail": [{**{k: v for k, v in r.items() if k != "live_at"},
                        "live": "live_at" in r} for r in detail]}


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", required=True, help="HOST:PORT of the proxy")
    p.add_argument("--path", required=True, help="request target, e.g. /bulk?events=1000")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--expect", type=int, default=None,
                   help="events expected per stream (required but with --drain)")
    p.add_argument("--latency", action="store_true", help="record per-event latency")
    p.add_argument("--sequential", action="store_true",
                   help="run the streams one after another (time-to-first-byte scenario)")
    p.add_argument("--drain", action="store_true",
                   help="drain scenario: print OPEN once every stream is live, then read every "
                        "stream to its end, however the proxy ends it")
    p.add_argument("--open-concurrency", type=int, default=50,
                   help="--drain: streams at most waiting for their first event at a time")
    p.add_argument("--open-retries", type=int, default=5,
                   help="--drain: retries of a stream refused (503) before it was live")
    p.add_argument("--open-timeout", type=float, default=60.0,
                   help="--drain: print OPEN after this long even if not every stream is live")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--wait-go", action="store_true", help="print READY, wait for a stdin line")
    args = p.parse_args()
    if args.expect is None and not args.drain:
        p.error("--expect is required (but with --drain)")
    pin_to(args.cpu)
    if args.wait_go:
        print("READY", flush=True)
        sys.stdin.readline()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    out = trio.run(run_drain if args.drain else run, args)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps(out), flush=True)
    sys.exit(1 if out["n_errors"] else 0)


if __name__ == "__main__":
    cli()
