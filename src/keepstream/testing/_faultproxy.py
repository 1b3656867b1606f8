"""An in-process TCP fault proxy with Toxiproxy's toxics: :class:`FaultProxy`.

``await nursery.start(run_fault_proxy, host, port)`` listens on ``127.0.0.1`` (a free port) and
forwards every accepted connection to ``host:port``. Toxics are added and removed while it runs
and use Toxiproxy's names, attributes and directions: ``downstream`` is target -> client,
``upstream`` is client -> target. The toxics of one direction form a pipeline in the order they
were added; a change applies to data read after it.

- ``latency`` (``latency`` ms, ``jitter`` ms): each chunk leaves ``latency +- jitter`` ms after
  it was read; order is kept.
- ``bandwidth`` (``rate`` KB/s, 1 KB = 1000 bytes, 0 = off): paces the bytes to ``rate``.
- ``slow_close`` (``delay`` ms): delays passing on an EOF (FIN).
- ``timeout`` (``timeout`` ms): drops all data while present (the connection stays open, so
  ``timeout=0`` holds the connection silent forever); with ``timeout > 0`` also closes the
  connection that long after the toxic became active for it.
- ``reset_peer`` (``timeout`` ms): the first chunk after it became active is dropped, and
  ``timeout`` ms later both sides get an RST (``SO_LINGER 0``).
- ``slicer`` (``average_size``, ``size_variation`` bytes, ``delay`` us): splits chunks into
  slices of ``average_size +- size_variation`` bytes with ``delay`` after each.
- ``limit_data`` (``bytes``): closes the connection once exactly ``bytes`` passed in that
  direction.

``toxicity`` is the probability that the toxic applies to a given connection (rolled once per
connection and toxic). Differences from Toxiproxy, on purpose: ``timeout``'s timer runs from the
moment the toxic becomes active (Toxiproxy restarts it with every dropped chunk); an EOF is passed
on as a half-close (``shutdown(SHUT_WR)``) and the connection closes once both directions ended;
an RST from one side is passed on as an RST to the other side, after the data read before it.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

import trio

__all__ = ["FaultProxy", "Toxic", "run_fault_proxy"]

Direction = Literal["upstream", "downstream"]

TOXIC_ATTRIBUTES: Final[Mapping[str, Mapping[str, float]]] = MappingProxyType(
    {
        "latency": {"latency": 0, "jitter": 0},
        "bandwidth": {"rate": 0},
        "slow_close": {"delay": 0},
        "timeout": {"timeout": 0},
        "reset_peer": {"timeout": 0},
        "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
        "limit_data": {"bytes": 0},
    }
)

_READ_SIZE = 65536
_PIPE_CHUNKS = 256


@dataclass(frozen=True)
class Toxic:
    """One toxic as configured: ``kind`` is the Toxiproxy type, ``attributes`` its settings."""

    name: str
    kind: str
    stream: Direction
    toxicity: float
    attributes: Mapping[str, float]

    def __getitem__(self, key: str) -> float:
        return self.attributes[key]


class _Stop(Exception):
    """Internal: the pipeline ended the connection; stop processing this direction."""


_EOF: Final = "eof"
_RESET: Final = "reset"
_Item = tuple[bytes, float] | Literal["eof", "reset"]


@dataclass
class _ToxicState:
    """Per-connection state of one toxic."""

    active: bool
    transmitted: int = 0
    next_time: float = 0.0
    triggered: bool = False
    timer: trio.CancelScope | None = None


def _linger_zero(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class _Link:
    """One proxied connection: a client socket, a target socket, a pipe per direction."""

    def __init__(
        self, proxy: FaultProxy, client: trio.SocketStream, server: trio.SocketStream
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.states: dict[str, _ToxicState] = {}
        self.done: set[Direction] = set()
        self.closed = False
        self.nursery: trio.Nursery | None = None

    # -- toxics -------------------------------------------------------------------------------

    def attach(self, toxic: Toxic) -> None:
        state = _ToxicState(active=self.proxy._rng.random() < toxic.toxicity)
        self.states[toxic.name] = state
        if (
            state.active
            and toxic.kind == "timeout"
            and toxic["timeout"] > 0
            and self.nursery is not None
        ):
            state.timer = trio.CancelScope()
            self.nursery.start_soon(self._close_later, state.timer, toxic["timeout"] / 1000)

    def detach(self, name: str) -> None:
        state = self.states.pop(name, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    async def _close_later(self, scope: trio.CancelScope, delay: float) -> None:
        with scope:
            await trio.sleep(delay)
            self.abort(reset=False)

    def stages(self, direction: Direction) -> list[tuple[Toxic, _ToxicState]]:
        out = []
        for name, toxic in self.proxy.toxics.items():
            state = self.states.get(name)
            if toxic.stream == direction and state is not None and state.active:
                out.append((toxic, state))
        return out

    # -- lifecycle ----------------------------------------------------------------------------

    def abort(self, *, reset: bool) -> None:
        """Close both sockets now (with RST when ``reset``) and stop every task of the link."""
        if self.closed:
            return
        self.closed = True
        self.proxy._links.discard(self)
        for stream in (self.client, self.server):
            if reset:
                _linger_zero(stream.socket)
            stream.socket.close()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def direction_done(self, direction: Direction) -> None:
        self.done.add(direction)
        if len(self.done) == 2:
            self.abort(reset=False)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.proxy._links.add(self)
                for toxic in list(self.proxy.toxics.values()):
                    self.attach(toxic)
                pipes: list[tuple[Direction, trio.SocketStream, trio.SocketStream]] = [
                    ("upstream", self.client, self.server),
                    ("downstream", self.server, self.client),
                ]
                for direction, src, dst in pipes:
                    send, receive = trio.open_memory_channel[_Item](_PIPE_CHUNKS)
                    nursery.start_soon(self._read, src, send)
                    nursery.start_soon(self._write, direction, dst, receive)
        finally:
            self.proxy._links.discard(self)
            self.abort(reset=False)

    async def _read(self, src: trio.SocketStream, send: trio.MemorySendChannel[_Item]) -> None:
        async with send:
            try:
                while True:
                    data = await src.receive_some(_READ_SIZE)
                    if not data:
                        await send.send(_EOF)
                        return
                    await send.send((data, trio.current_time()))
            except trio.BrokenResourceError:
                await send.send(_RESET)
            except trio.ClosedResourceError:
                return

    async def _write(
        self,
        direction: Direction,
        dst: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[_Item],
    ) -> None:
        async with receive:
            try:
                async for item in receive:
                    if isinstance(item, tuple):
                        data, stamp = item
                        await self._push(self.stages(direction), 0, data, stamp, dst)
                    elif item == _EOF:
                        await self._eof(direction, dst)
                        return
                    else:
                        self.abort(reset=True)
                        return
            except _Stop:
                return
            except trio.BrokenResourceError:
                self.abort(reset=True)
            except trio.ClosedResourceError:
                self.abort(reset=False)

    async def _eof(self, direction: Direction, dst: trio.SocketStream) -> None:
        for toxic, _state in self.stages(direction):
            if toxic.kind == "slow_close":
                await trio.sleep(toxic["delay"] / 1000)
        try:
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.abort(reset=False)
            return
        self.direction_done(direction)

    async def _push(
        self,
        stages: list[tuple[Toxic, _ToxicState]],
        index: int,
        data: bytes,
        stamp: float,
        dst: trio.SocketStream,
    ) -> None:
        if index == len(stages):
            await dst.send_all(data)
            return
        toxic, state = stages[index]

        def nxt(piece: bytes) -> Awaitable[None]:
            return self._push(stages, index + 1, piece, stamp, dst)

        handler = _HANDLERS[toxic.kind]
        await handler(self, toxic, state, data, stamp, nxt)


_Next = Callable[[bytes], Awaitable[None]]


async def _latency(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    delay = toxic["latency"]
    jitter = toxic["jitter"]
    if jitter > 0:
        delay += link.proxy._rng.uniform(-jitter, jitter)
    await trio.sleep_until(stamp + max(delay, 0) / 1000)
    await nxt(data)


async def _bandwidth(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    rate = toxic["rate"]
    if rate <= 0:
        await nxt(data)
        return
    per_second = rate * 1000
    piece = max(1, int(rate * 100))  # send in 100 ms portions, like Toxiproxy
    for offset in range(0, len(data), piece):
        part = data[offset : offset + piece]
        state.next_time = max(state.next_time, trio.current_time()) + len(part) / per_second
        await trio.sleep_until(state.next_time)
        await nxt(part)


async def _pass(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    await nxt(data)


async def _timeout(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    return  # data is dropped while the toxic is present


async def _reset_peer(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    if not state.triggered:
        state.triggered = True
        await trio.sleep(toxic["timeout"] / 1000)
        link.abort(reset=True)
        raise _Stop


async def _slicer(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    average = int(toxic["average_size"])
    variation = int(toxic["size_variation"])
    delay = toxic["delay"] / 1_000_000
    if average <= 0:
        await nxt(data)
        return
    offset = 0
    while offset < len(data):
        size = average
        if variation > 0:
            size += link.proxy._rng.randint(-variation, variation)
        size = max(1, size)
        await nxt(data[offset : offset + size])
        offset += size
        if delay > 0:
            await trio.sleep(delay)


async def _limit_data(
    link: _Link, toxic: Toxic, state: _ToxicState, data: bytes, stamp: float, nxt: _Next
) -> None:
    limit = int(toxic["bytes"])
    remaining = max(limit - state.transmitted, 0)
    part = data[:remaining]
    if part:
        await nxt(part)
        state.transmitted += len(part)
    if state.transmitted >= limit:
        link.abort(reset=False)
        raise _Stop


_Handler = Callable[[_Link, Toxic, _ToxicState, bytes, float, _Next], Awaitable[None]]
_HANDLERS: Final[dict[str, _Handler]] = {
    "latency": _latency,
    "bandwidth": _bandwidth,
    "slow_close": _pass,
    "timeout": _timeout,
    "reset_peer": _reset_peer,
    "slicer": _slicer,
    "limit_data": _limit_data,
}


@dataclass
class FaultProxy:
    """A running fault proxy; get one from ``await nursery.start(run_fault_proxy, host, port)``.

    ``listen`` is ``"127.0.0.1:PORT"``; connect clients to ``port``. ``toxics`` maps names to
    the configured :class:`Toxic` objects in pipeline order.
    """

    port: int
    target_host: str
    target_port: int
    seed: int | None = None
    toxics: dict[str, Toxic] = field(default_factory=dict)
    connections_seen: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._links: set[_Link] = set()

    @property
    def listen(self) -> str:
        """``"127.0.0.1:PORT"``, the address clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"``, for HTTP through the proxy."""
        return f"http://{self.listen}"

    def add_toxic(
        self,
        kind: str,
        *,
        name: str | None = None,
        stream: Direction = "downstream",
        toxicity: float = 1.0,
        **attributes: float,
    ) -> str:
        """Add a toxic (applies to open connections at once); return its name.

        The default name is ``f"{kind}_{stream}"`` as in Toxiproxy. Raises ``ValueError`` for an
        unknown kind or attribute, a negative value, or a name already in use.
        """
        if kind not in TOXIC_ATTRIBUTES:
            raise ValueError(f"unknown toxic kind {kind!r}")
        if stream not in ("upstream", "downstream"):
            raise ValueError(f"stream must be 'upstream' or 'downstream', not {stream!r}")
        if not 0.0 <= toxicity <= 1.0:
            raise ValueError("toxicity must be within [0, 1]")
        name = name or f"{kind}_{stream}"
        if name in self.toxics:
            raise ValueError(f"toxic {name!r} already exists")
        toxic = Toxic(name, kind, stream, toxicity, self._attributes(kind, attributes))
        self.toxics[name] = toxic
        for link in list(self._links):
            link.attach(toxic)
        return name

    def update_toxic(self, name: str, **attributes: float) -> None:
        """Change attributes of a toxic in place; per-connection state is kept."""
        old = self.toxics[name]
        merged = {**old.attributes, **attributes}
        self.toxics[name] = Toxic(
            name, old.kind, old.stream, old.toxicity, self._attributes(old.kind, merged)
        )

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic; data read afterwards passes without it. ``KeyError`` if unknown."""
        del self.toxics[name]
        for link in list(self._links):
            link.detach(name)

    def remove_all_toxics(self) -> None:
        """Remove every toxic."""
        for name in list(self.toxics):
            self.remove_toxic(name)

    def open_connections(self) -> int:
        """Number of proxied connections currently open."""
        return len(self._links)

    def close_all(self, *, reset: bool = False) -> None:
        """Close every proxied connection now (with RST when ``reset``)."""
        for link in list(self._links):
            link.abort(reset=reset)

    @staticmethod
    def _attributes(kind: str, given: Mapping[str, float]) -> Mapping[str, float]:
        allowed = TOXIC_ATTRIBUTES[kind]
        unknown = set(given) - set(allowed)
        if unknown:
            raise ValueError(f"unknown attribute(s) for {kind}: {sorted(unknown)}")
        merged = {**allowed, **given}
        for key, value in merged.items():
            if value < 0:
                raise ValueError(f"{kind}.{key} must be >= 0")
        return MappingProxyType(merged)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections_seen += 1
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            client.socket.close()
            return
        await _Link(self, client, server).run()


async def run_fault_proxy(
    target_host: str,
    target_port: int,
    *,
    seed: int | None = None,
    task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`FaultProxy` from ``127.0.0.1:<free port>`` to ``target_host:target_port``.

    ``seed`` makes toxicity rolls, jitter and slice sizes reproducible. Runs until cancelled;
    cancelling closes every proxied connection.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    proxy = FaultProxy(port=port, target_host=target_host, target_port=target_port, seed=seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy._handle, listeners)
        task_status.started(proxy)
