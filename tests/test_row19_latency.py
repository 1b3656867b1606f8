"""FAULTS row 19: latency, jitter and slicing on the upstream link; keepstream adds no delay.

The chain, all on loopback in one Trio run (one clock for every timestamp)::

    fake upstream -> FaultProxy (downstream: latency 200 +- 150 ms, slicer 3 bytes)
                  -> timestamping tap -> keepstream -> timestamping raw client

The tap is a plain TCP forwarder written here: for the bytes it forwards to keepstream it records
``(cumulative bytes, trio.current_time())`` right after each ``send_all``. The client records the
same for the bytes it receives. Both raw streams are HTTP/1.1 chunked, with different chunk
boundaries (one chunk per event upstream, one per forwarded read downstream), so each is
de-chunked while keeping, for every body byte, its offset in the raw stream; an event is then
found by its unique ``id: n`` line and the blank line after it.

Checked: byte-identical forwarding (client body == the upstream's expected body == the journaled
body == what crossed the tap), no added coalescing (keepstream sends about one HTTP chunk per
read), and the added latency per event (the client has the event's last byte minus the tap
forwarded it) and per forwarded chunk (~3,400 of 3 bytes each). FAULTS' target is an added p99
under 5 ms; the assertion here is 50 ms, generous for a shared CI machine, and the figures are
printed, also without the windows where the whole process was descheduled (measured by a 1 ms
ticker comparing wall and thread CPU time), which on a loaded machine dominate the tail.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import partial

import trio

from keepstream.testing import FakeResponseSpec, FakeUpstream, run_fault_proxy, run_keepstream

from .conftest import make_config

SPEC = FakeResponseSpec(events=100, interval=0.02, style="plain")
_EVENT = re.compile(rb"(?:^|\n)(id: (\d+)\n)")


@dataclass
class Timeline:
    """Bytes of one direction of a connection and when they passed: ``(cumulative, time)``."""

    raw: bytearray = field(default_factory=bytearray)
    marks: list[tuple[int, float]] = field(default_factory=list)

    def add(self, data: bytes) -> None:
        self.raw += data
        self.marks.append((len(self.raw), trio.current_time()))

    def time_of(self, raw_offset: int) -> float:
        """When the byte at ``raw_offset`` passed (the first mark that covers it)."""
        i = bisect_right(self.marks, raw_offset, key=lambda mark: mark[0])
        if i == len(self.marks):
            raise AssertionError(f"byte {raw_offset} never passed ({len(self.raw)} bytes)")
        return self.marks[i][1]


@dataclass
class Tap:
    port: int
    connections: list[Timeline] = field(default_factory=list)


async def run_tap(
    target_port: int, *, task_status: trio.TaskStatus[Tap] = trio.TASK_STATUS_IGNORED
) -> None:
    """Forward 127.0.0.1:<free port> -> 127.0.0.1:target_port, timestamping target -> client."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    tap = Tap(listeners[0].socket.getsockname()[1])

    async def pipe(src: trio.SocketStream, dst: trio.SocketStream, log: Timeline | None) -> None:
        try:
            while data := await src.receive_some(65536):
                if log is not None:
                    log.add(data)  # stamped as it leaves: send_all yields to others after
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        log = Timeline()
        tap.connections.append(log)
        async with (
            client,
            await trio.open_tcp_stream("127.0.0.1", target_port) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(pipe, client, server, None)
            nursery.start_soon(pipe, server, client, log)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(tap)


@dataclass
class Dechunked:
    body: bytes
    offsets: list[int]  # raw offset of every body byte
    chunks: int
    complete: bool  # the 0-chunk and the final CRLF arrived


def dechunk(raw: bytes) -> Dechunked:
    """De-chunk an HTTP/1.1 chunked response, keeping where each body byte was in ``raw``."""
    pos = raw.index(b"\r\n\r\n") + 4
    body = bytearray()
    offsets: list[int] = []
    chunks = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return Dechunked(bytes(body), offsets, chunks, False)
        size = int(raw[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            return Dechunked(bytes(body), offsets, chunks, raw.endswith(b"\r\n\r\n", start - 2))
        got = raw[start : start + size]
        body += got
        offsets.extend(range(start, start + len(got)))
        chunks += 1
        if len(got) < size:
            return Dechunked(bytes(body), offsets, chunks, False)
        pos = start + size + 2


def event_ends(body: bytes) -> dict[int, int]:
    """``{event id: body offset of its last byte}`` (the second newline of its blank line)."""
    ends: dict[int, int] = {}
    for m in _EVENT.finditer(body):
        n = int(m.group(2))
        end = body.index(b"\n\n", m.start(1)) + 1
        assert n not in ends, f"event id {n} twice"
        ends[n] = end
    return ends


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


#: Wall time the process must lose to another process (not to its own work) to count.
STALL = 0.002


async def watch_off_cpu(stalls: list[tuple[float, float]]) -> None:
    """Record the windows where this process was not running although it had work.

    A 1 ms tick: if the wall clock advanced much more than this thread's CPU time, the process
    was descheduled (a loaded CI machine), not busy with keepstream or the harness. Latency
    windows overlapping such a stall are reported apart; they are still asserted.
    """
    while True:
        t, cpu = trio.current_time(), time.thread_time()
        await trio.sleep(0.001)
        wall = trio.current_time() - t
        if wall - 0.001 - (time.thread_time() - cpu) > STALL:
            stalls.append((t, t + wall))


async def test_row19_latency_jitter_slicing(
    fake_upstream: FakeUpstream, journal_url: str, nursery: trio.Nursery
) -> None:
    fp = await nursery.start(partial(run_fault_proxy, "127.0.0.1", fake_upstream.port, seed=19))
    fp.add_toxic("latency", stream="downstream", latency=200, jitter=150)
    fp.add_toxic("slicer", stream="downstream", average_size=3, size_variation=0, delay=100)
    tap: Tap = await nursery.start(run_tap, fp.port)
    stalls: list[tuple[float, float]] = []
    nursery.start_soon(watch_off_cpu, stalls)
    expected = SPEC.expected_body()
    client = Timeline()
    with trio.fail_after(30):
        async with run_keepstream(make_config(f"http://127.0.0.1:{tap.port}", journal_url)) as ks:
            head = "GET /ev HTTP/1.1\r\nHost: keepstream\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in SPEC.headers()
            ) + "\r\n"
            async with await trio.open_tcp_stream("127.0.0.1", ks.port) as stream:
                await stream.send_all(head.encode())
                while True:
                    data = await stream.receive_some(65536)
                    assert data, "keepstream closed the connection before the end of the body"
                    client.add(data)
                    # Cheap test first: de-chunking is O(n) and this loop shares the CPU.
                    if client.raw.endswith(b"0\r\n\r\n") and dechunk(bytes(client.raw)).complete:
                        break
            status_line = bytes(client.raw).split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            sid = re.search(rb"(?i)\r\nkeepstream-id: ([0-9a-f]+)\r\n", client.raw)
            assert sid is not None
            rec = await ks.wait_terminal(sid.group(1).decode())
            journal = await ks.body(sid.group(1).decode())

    # Byte-identical forwarding, every hop.
    assert len(tap.connections) == 1
    upstream = tap.connections[0]
    up, cl = dechunk(bytes(upstream.raw)), dechunk(bytes(client.raw))
    assert up.complete and cl.complete
    assert up.body == expected
    assert cl.body == expected
    assert journal == expected
    assert rec["status"] == "completed" and rec["bytes"] == len(expected)
    assert rec["events"] == SPEC.events

    # Added latency per event: the client has the event's last byte - the tap forwarded it.
    up_ends, cl_ends = event_ends(up.body), event_ends(cl.body)
    assert sorted(up_ends) == sorted(cl_ends) == list(range(SPEC.events))
    per_event = [  # (tap time, client time)
        (upstream.time_of(up.offsets[up_ends[n]]), client.time_of(cl.offsets[cl_ends[n]]))
        for n in range(SPEC.events)
    ]
    # Added latency per forwarded chunk: for each forward of the tap, the client has all of it.
    per_chunk: list[tuple[float, float]] = []
    previous = 0
    for cumulative, t in upstream.marks:
        last = bisect_left(up.offsets, cumulative) - 1  # the last body byte forwarded so far
        if last >= previous:  # this forward carried body bytes (not only framing or the head)
            per_chunk.append((t, client.time_of(cl.offsets[last])))
            previous = last + 1

    def off_cpu(window: tuple[float, float]) -> bool:
        return any(a < window[1] and window[0] < b for a, b in stalls)

    lines = []
    stats: dict[str, tuple[float, float]] = {}
    for name, windows in (("event", per_event), ("chunk", per_chunk)):
        added = [b - a for a, b in windows]
        assert min(added) >= 0, f"{name}: the client had bytes before the tap sent them"
        calm = [b - a for a, b in windows if not off_cpu((a, b))]
        stats[name] = (percentile(added, 0.99), percentile(calm, 0.99) if calm else math.nan)
        lines.append(
            f"per {name} (n={len(added)}): p50 {statistics.median(added) * 1000:.2f} ms, "
            f"p95 {percentile(added, 0.95) * 1000:.2f} ms, p99 {stats[name][0] * 1000:.2f} ms, "
            f"max {max(added) * 1000:.2f} ms; without the {len(added) - len(calm)} windows "
            f"where the process was off-CPU: p99 {stats[name][1] * 1000:.2f} ms"
        )
    verdict = "holds" if stats["chunk"][0] < 0.005 else (
        "holds once off-CPU windows are excluded" if stats["chunk"][1] < 0.005 else "MISSED")
    print(
        f"\nrow 19: {len(upstream.marks)} tap forwards ({len(per_chunk)} with body bytes), "
        f"{cl.chunks} HTTP chunks to the client in {len(client.marks)} reads; "
        f"{len(stalls)} off-CPU stalls > {STALL * 1000:.0f} ms (max "
        f"{max((b - a for a, b in stalls), default=0) * 1000:.1f} ms)\n  "
        + "\n  ".join(lines)
        + f"\n  FAULTS target (added p99 per chunk < 5 ms): {verdict}"
    )
    # No added coalescing: keepstream forwards what it reads as it reads it.
    assert cl.chunks >= len(per_chunk) // 2, (cl.chunks, len(per_chunk))
    assert len(per_chunk) > 3 * SPEC.events  # the slicer really sliced
    assert stats["event"][0] < 0.05
    assert stats["chunk"][0] < 0.05
