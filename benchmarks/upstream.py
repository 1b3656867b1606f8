"""A lean SSE origin for the benchmarks: raw trio sockets, no HTTP library.

Every response is ``200 text/event-stream`` with chunked framing, one 100-byte event per HTTP
chunk, each chunk in its own ``send()`` (see ``_bench.make_chunk``). The request target picks
the behaviour (the request head is read up to the blank line; a body is not expected)::

    GET /bulk?events=N[&batch=K]  N events, written as fast as the socket takes them; with
                                  ``batch`` K chunks (still one per event) per ``write()``
    GET /paced?events=N&rate=R    N events, R per second, starting at a random phase within
                                  the first interval (so many streams do not tick in lockstep)

Either path takes ``&ts=0``: every event then carries the timestamp 0 instead of the write
time, so the body is deterministic (``_bench.upstream_bytes``; the drain scenario checks
journal bodies against it byte for byte).

Connections are kept alive for further requests until the client closes them.

    python benchmarks/upstream.py [--host 127.0.0.1] [--port 0] [--cpu N]

prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

import trio
from _bench import make_chunk, pin_to

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
_END = b"0\r\n\r\n"
_BAD = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _serve_conn(sock: trio.socket.SocketType) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    data = await sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            url = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            stamp = q.get("ts") != "0"
            try:
                if url.path.endswith("/bulk"):
                    await _bulk(sock, int(q.get("events", "1000")), stamp,
                                int(q.get("batch", "1")))
                elif url.path.endswith("/paced"):
                    await _paced(sock, int(q.get("events", "100")), float(q.get("rate", "50")),
                                 stamp)
                else:
                    await _send_all(sock, _BAD)
            except OSError:
                return  # the proxy went away


def _zero() -> int:
    return 0


#: Bulk: events written back to back (each its own write() system call) before yielding.
BURST = 64


async def _bulk(sock: trio.socket.SocketType, n: int, stamp: bool = True,
                batch: int = 1) -> None:
    """As fast as the socket takes them, still one chunk per ``write()``: a trio ``send()``
    per event costs this process about 10 us, which made the upstream, not the proxy, the
    bottleneck of the bulk scenario (the proxy then read 5 events per wake-up, a paced-like
    regime). Non-blocking writes in bursts of ``BURST``, a yield between bursts (fair to the
    other streams), an I/O wait only when the socket is full."""
    await _send_all(sock, _HEAD)
    fd = sock.fileno()
    mono = time.monotonic_ns if stamp else _zero
    seq = 0
    while seq < n:
        for _ in range(min(BURST, n - seq)):
            if seq >= n:
                break
            if batch > 1:  # ``batch`` chunks (still one per event) in one write()
                k = min(batch, n - seq)
                chunk = b"".join([make_chunk(seq + i, mono()) for i in range(k)])
                seq += k - 1
            else:
                chunk = make_chunk(seq, mono())
            try:
                sent = os.write(fd, chunk)
            except BlockingIOError:
                sent = 0
            seq += 1
            if sent != len(chunk):
                await _send_all(sock, chunk[sent:])
        await trio.sleep(0)
    await _send_all(sock, _END)


async def _paced(sock: trio.socket.SocketType, n: int, rate: float,
                 stamp: bool = True) -> None:
    await _send_all(sock, _HEAD)
    period = 1.0 / rate
    t0 = trio.current_time() + random.uniform(0, period)
    send = sock.send
    mono = time.monotonic_ns if stamp else _zero
    for seq in range(n):
        await trio.sleep_until(t0 + seq * period)
        chunk = make_chunk(seq, mono())
        sent = await send(chunk)
        if sent != len(chunk):
            await _send_all(sock, chunk[sent:])
    await _send_all(sock, _END)


async def main(host: str, port: int) -> None:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((host, port))
    listener.listen(4096)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_serve_conn, conn)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args()
    pin_to(args.cpu)
    try:
        trio.run(main, args.host, args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    cli()
