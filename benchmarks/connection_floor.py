"""The floor of a short request's cost: a new client connection, relayed over one kept-alive
upstream connection, on trio and on asyncio, with no HTTP library and no journal.

The ttfb scenario of ``run.py`` (one short request after another, a new connection each) is
the issue-8 target keepstream misses by the most. This asks what the event loop alone costs
for that shape of work, so the rest (HTTP parsing, the journal, keepstream's own checks) can
be read off as what is above it. Modes, each the least code that does the job:

* ``trio-server`` / ``asyncio-server``: accept, read the request head, write a fixed response,
  close. No upstream: the cost of a connection itself.
* ``protocol-server`` / ``protocol-relay``: the same two on ``asyncio.Protocol`` callbacks.
* ``trio-relay`` / ``asyncio-relay``: the same, but the response comes from an upstream over
  one kept-alive connection (the request head forwarded as it came, the response read to its
  ``Content-Length`` and written back). What a relay costs before it does anything HTTP.

trio: ``trio.serve_listeners`` and ``SocketStream`` (keepstream's lean engine uses trio's
sockets more directly); asyncio: ``asyncio.start_server`` and ``open_connection`` (streams) on
the default loop; protocol: ``asyncio.Protocol`` callbacks on the same loop, no streams
(aiohttp's own base: its server and client are protocols). The client and the upstream are
forked children pinned to CPU 1; the figure is the relay process's own CPU (``getrusage``,
user + system) per request on CPU 0, and the client's time to first byte. Compare modes
within one run; the machine is shared.

    python benchmarks/connection_floor.py                   # every mode, 2,000 requests
    python benchmarks/connection_floor.py --mode trio-relay --requests 200 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time

import trio
from wakeup_floor import _cpu, _pin  # (this directory: run as a script)

MODES = ("trio-server", "asyncio-server", "protocol-server",
         "trio-relay", "asyncio-relay", "protocol-relay")
REQUEST = b"GET /one HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
BODY = b"data: " + b"x" * 92 + b"\n\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
HEAD_END = b"\r\n\r\n"


def _fork(child: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _pin(1)
            child(*args)  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


# -- the children -----------------------------------------------------------------------------

def _upstream(listener: socket.socket) -> None:
    """Answer every request head on each accepted connection with ``RESPONSE``, until EOF."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
                while HEAD_END in buf:
                    _, _, buf = buf.partition(HEAD_END)
                    conn.sendall(RESPONSE)


def _client(port: int, requests: int, report: int) -> None:
    """``requests`` sequential requests, a new connection each; writes the times to first
    byte (ms, one per line) to the ``report`` pipe."""
    ttfb: list[float] = []
    for _ in range(requests):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(REQUEST)
            data = s.recv(65536)
            ttfb.append((time.perf_counter() - t0) * 1e3)
            while len(data) < len(RESPONSE):
                more = s.recv(65536)
                if not more:
                    break
                data += more
            if data != RESPONSE:
                raise SystemExit(f"bad response: {data[:80]!r}")
    os.write(report, "\n".join(f"{t:.4f}" for t in ttfb).encode())
    os.close(report)


# -- trio -------------------------------------------------------------------------------------

async def _trio_read_head(stream: trio.SocketStream) -> bytes:
    buf = b""
    while HEAD_END not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return b""
        buf += data
    return buf


async def _trio(listener: socket.socket, requests: int, upstream_port: int | None) -> None:
    done = 0
    idle: list[trio.SocketStream] = []  # kept-alive upstream connections

    async def ask(head: bytes) -> bytes:
        up = idle.pop() if idle else await trio.open_tcp_stream("127.0.0.1", upstream_port)
        await up.send_all(head)
        buf = b""
        while len(buf) < len(RESPONSE):
            data = await up.receive_some(65536)
            if not data:
                raise OSError("upstream closed")
            buf += data
        idle.append(up)
        return buf

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal done
        async with stream:
            head = await _trio_read_head(stream)
            if head:
                response = RESPONSE if upstream_port is None else await ask(head)
                await stream.send_all(response)
        done += 1
        if done == requests:
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
    for up in idle:
        await up.aclose()


# -- asyncio ----------------------------------------------------------------------------------

def _asyncio(listener: socket.socket, requests: int, upstream_port: int | None) -> None:
    async def main() -> None:
        done = 0
        finished = asyncio.Event()
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def ask(head: bytes) -> bytes:
            if idle:
                reader, writer = idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            writer.write(head)
            buf = await reader.readexactly(len(RESPONSE))
            idle.append((reader, writer))
            return buf

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal done
            try:
                head = await reader.readuntil(HEAD_END)
                response = RESPONSE if upstream_port is None else await ask(head)
                writer.write(response)
            finally:
                writer.close()
            done += 1
            if done == requests:
                finished.set()

        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            await finished.wait()
        for _, writer in idle:
            writer.close()

    asyncio.run(main())


# -- asyncio protocols -------------------------------------------------------------------------

def _protocol(listener: socket.socket, requests: int, upstream_port: int | None) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        done = 0
        idle: list[Upstream] = []
        connecting: set[asyncio.Task[None]] = set()

        class Upstream(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.buf = b""
                self.client: Client | None = None

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if len(self.buf) >= len(RESPONSE) and self.client is not None:
                    client, self.client, response, self.buf = self.client, None, self.buf, b""
                    idle.append(self)
                    client.answer(response)

        class Client(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if HEAD_END not in self.buf:
                    return
                head, self.buf = self.buf, b""
                if upstream_port is None:
                    self.answer(RESPONSE)
                elif idle:
                    self.ask(idle.pop(), head)
                else:
                    task = loop.create_task(self.connect(head))
                    connecting.add(task)
                    task.add_done_callback(connecting.discard)

            async def connect(self, head: bytes) -> None:
                _, up = await loop.create_connection(Upstream, "127.0.0.1", upstream_port)
                self.ask(up, head)

            def ask(self, up: Upstream, head: bytes) -> None:
                up.client = self
                up.transport.write(head)

            def answer(self, response: bytes) -> None:
                self.transport.write(response)
                self.transport.close()

            def connection_lost(self, exc: Exception | None) -> None:
                nonlocal done
                done += 1
                if done == requests and not finished.done():
                    finished.set_result(None)

        server = await loop.create_server(Client, sock=listener)
        async with server:
            await finished
        for up in idle:
            up.transport.close()

    asyncio.run(main())


# -- one run ----------------------------------------------------------------------------------

def run(mode: str, requests: int) -> tuple[float, float, float]:
    """(relay CPU µs per request, client TTFB p50 ms, p99 ms) for one mode."""
    upstream_port: int | None = None
    up_pid = 0
    if mode.endswith("-relay"):
        up_listener = socket.create_server(("127.0.0.1", 0))
        upstream_port = up_listener.getsockname()[1]
        up_pid = _fork(_upstream, up_listener)
        up_listener.close()
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    r, w = os.pipe()
    _pin(0)
    cpu = _cpu()
    client_pid = _fork(_client, port, requests, w)
    os.close(w)
    if mode.startswith("trio"):
        trio.run(_trio, listener, requests, upstream_port)
    elif mode.startswith("protocol"):
        _protocol(listener, requests, upstream_port)
    else:
        _asyncio(listener, requests, upstream_port)
    cpu = _cpu() - cpu
    listener.close()
    report = b""
    while chunk := os.read(r, 65536):
        report += chunk
    os.close(r)
    _, status = os.waitpid(client_pid, 0)
    if status != 0:
        raise SystemExit(f"{mode}: the client failed")
    if up_pid:
        os.kill(up_pid, 9)
        os.waitpid(up_pid, 0)
    ttfb = sorted(float(x) for x in report.split())
    if len(ttfb) != requests:
        raise SystemExit(f"{mode}: {len(ttfb)} of {requests} requests answered")
    return (cpu / requests * 1e6, ttfb[len(ttfb) // 2],
            ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=MODES, action="append")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode (median), interleaved")
    args = ap.parse_args()
    modes = args.mode or list(MODES)
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            results[mode].append(run(mode, args.requests))
    print(f"{args.requests} sequential requests, a new connection each, x {args.repeat} "
          "(median); relay on CPU 0")
    print(f"{'mode':<15} {'us CPU/request':>15} {'ttfb p50 ms':>12} {'p99 ms':>8}")
    for mode in modes:
        cpu, p50, p99 = (statistics.median(x[i] for x in results[mode]) for i in range(3))
        print(f"{mode:<15} {cpu:>15.1f} {p50:>12.3f} {p99:>8.3f}")


if __name__ == "__main__":
    main()
