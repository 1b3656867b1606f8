"""The floor of a paced event's cost: CPU per wake-up of N sockets at R messages/s each.

No HTTP, no journal: each message is read and written straight back (one ``recv``, one
``send``), so what is measured is the cost of being woken for a small message and nothing
else, by three ways of waiting:

* ``trio-tasks``: a trio task per socket, ``wait_readable`` then read (what a stream task
  reading its upstream through trio pays: one task step and one epoll re-arm per event);
* ``trio-poller``: one trio task waits for a level-triggered epoll of its own, then reads
  every ready socket without yielding (``keepstream._poller``'s way);
* ``asyncio``: ``asyncio.Protocol.data_received`` on the default event loop (aiohttp's base).

The writer is a forked child pinned to the other core; the figure is the reader process's
own CPU (``getrusage``) per message. Compare modes within one run; the machine is shared.

    python benchmarks/wakeup_floor.py                       # all three, 200 x 50/s, 8 s
    python benchmarks/wakeup_floor.py --mode trio-poller --seconds 2 --sockets 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import select
import socket
import time

import trio

MODES = ("trio-tasks", "trio-poller", "asyncio")
MESSAGE = b"x" * 100


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def _writer(socks: list[socket.socket], rate: float, seconds: float) -> None:
    """The child: one message per socket every 1/rate s (staggered), echoes drained."""
    _pin(1)
    ep = select.epoll()
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
    n = len(socks)
    period = 1.0 / rate
    start = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        due = int(now / period * n)  # messages due by now, round robin over the sockets
        while sent < due:
            try:
                socks[sent % n].send(MESSAGE)
            except BlockingIOError:
                pass
            sent += 1
        for fd, _ in ep.poll(period / n):
            try:
                os.read(fd, 65536)
            except BlockingIOError:
                pass
    os._exit(0)


def _echo(s: socket.socket) -> int | None:
    """Read what ``s`` holds and write it back: messages echoed (0: nothing was waiting), or
    None at EOF (or a reset: the writer exited with echoes unread)."""
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return 0
    except ConnectionResetError:
        return None
    if not data:
        return None
    s.send(data)
    return len(data) // len(MESSAGE)  # (two may come in one read)


async def _trio_tasks(socks: list[socket.socket]) -> int:
    count = 0

    async def one(s: socket.socket) -> None:
        nonlocal count
        while True:
            await trio.lowlevel.wait_readable(s)
            n = _echo(s)
            if n is None:
                return
            count += n

    async with trio.open_nursery() as nursery:
        for s in socks:
            nursery.start_soon(one, s)
    return count


async def _trio_poller(socks: list[socket.socket]) -> int:
    count = 0
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    while by_fd:
        await trio.lowlevel.wait_readable(ep.fileno())
        for fd, _ in ep.poll(0, 128):
            n = _echo(by_fd[fd])
            if n is None:
                ep.unregister(fd)
                del by_fd[fd]
                continue
            count += n
    ep.close()
    return count


def _asyncio(socks: list[socket.socket]) -> int:
    count = 0

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            nonlocal count
            count += len(data) // len(MESSAGE)
            self.transport.write(data)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            left.discard(self)
            if not left:
                finished.set()

    async def main() -> None:
        nonlocal finished
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in socks:
            _, proto = await loop.connect_accepted_socket(Echo, s)
            left.add(proto)  # type: ignore[arg-type]
        await finished.wait()

    left: set[Echo] = set()
    finished: asyncio.Event
    asyncio.run(main())
    return count


def run(mode: str, sockets: int, rate: float, seconds: float) -> tuple[int, float]:
    """(messages read, reader CPU seconds) for one mode."""
    pairs = [socket.socketpair() for _ in range(sockets)]
    pid = os.fork()
    if pid == 0:
        for a, _ in pairs:
            a.close()
        _writer([b for _, b in pairs], rate, seconds)
    for _, b in pairs:
        b.close()
    socks = [a for a, _ in pairs]
    for s in socks:
        s.setblocking(False)
    _pin(0)
    cpu = _cpu()
    if mode == "asyncio":
        count = _asyncio(socks)
    else:
        fn = _trio_tasks if mode == "trio-tasks" else _trio_poller
        count = trio.run(fn, socks)
    cpu = _cpu() - cpu
    os.waitpid(pid, 0)
    for s in socks:
        s.close()
    return count, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=MODES, action="append")
    ap.add_argument("--sockets", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50.0, help="messages/s per socket")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"{args.sockets} sockets x {args.rate:g}/s for {args.seconds:g} s; reader on CPU 0")
    print(f"{'mode':<12} {'messages':>9} {'us CPU/message':>15}")
    for _ in range(args.repeat):
        for mode in args.mode or MODES:
            count, cpu = run(mode, args.sockets, args.rate, args.seconds)
            per = cpu / count * 1e6 if count else float("nan")
            print(f"{mode:<12} {count:>9} {per:>15.1f}")


if __name__ == "__main__":
    main()
