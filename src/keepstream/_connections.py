"""Serve Hypercorn's HTTP protocols on keepstream's listening socket, one connection at a time
contained.

This is ``hypercorn.trio.run.worker_serve`` cut down to what ``keepstream serve`` uses (one
plain-TCP listening socket it made itself, no lifespan: the supervisor lives in ``open_proxy``),
with one difference that matters on the edge: an exception escaping one connection's protocol
code ends that connection, never the server. Hypercorn 0.18 lets a few hostile requests raise
out of a connection (an HTTP/2 ``CONNECT`` without ``:path`` raises ``UnboundLocalError``; a
WebSocket handshake with bytes pipelined behind it, pgjones/hypercorn#225), and under
``worker_serve`` that tears down every connection of the process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import repr_socket_addr

log = logging.getLogger("keepstream")


class LeanTCPServer(TCPServer):
    """Hypercorn's trio ``TCPServer`` with a cheaper write path for the common case.

    Hypercorn's ``protocol_send`` takes a ``trio.Lock`` (one scheduler pass), opens a shielded
    cancel scope and calls ``SocketStream.send_all`` (another pass): profiled under keepstream's
    paced benchmark, about half of the downstream cost of each body ``send()``. When the lock
    is free, this writes the bytes straight to the socket with one non-blocking ``write()``
    (synchronous, so as uncancellable as Hypercorn's shielded write); only Hypercorn's own
    sends then yield once.
    Whatever the socket does not take at once (a slow or stalled reader), and every other event,
    goes through Hypercorn's own path unchanged, still holding the lock, so writes stay ordered
    and a stalled client is still ended by ``TCP_USER_TIMEOUT``. The same change would fit
    inside ``TCPServer.protocol_send`` upstream (``patches/hypercorn-lean-send.patch``).
    """

    _reader: trio.lowlevel.Task | None = None
    #: Shared by every connection of a server: set once keep-alive is over (serve_connections'
    #: ``close_trigger``).
    keep_alive: _KeepAlive | None = None

    async def run(self) -> None:
        self._reader = trio.lowlevel.current_task()  # reads the socket, runs Hypercorn's protocol
        await super().run()

    async def protocol_send(self, event: Event) -> None:
        if type(event) is not RawData or self.send_lock.locked():
            if type(event) is Updated and event.idle and self.keep_alive is not None and \
                    self.keep_alive.ended and type(self.protocol.protocol) is H11Protocol:
                # An HTTP/1.1 response ended after keep-alive is over: close now, as Hypercorn
                # does once ``terminated`` is set, rather than start an idle-timeout task to do
                # it later. (HTTP/2 keeps Hypercorn's way: a GOAWAY before the close.)
                event = Closed()
            await super().protocol_send(event)
            return
        sock = getattr(self.stream, "socket", None)  # None under TLS: Hypercorn's path
        fd = -1 if sock is None else sock.fileno()
        if fd < 0:
            await super().protocol_send(event)
            return
        data = event.data
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            await super().protocol_send(event)  # let Hypercorn see the error its own way
            return
        if sent < len(data):
            await super().protocol_send(RawData(data=data[sent:]))
        elif trio.lowlevel.current_task() is self._reader:
            # Hypercorn's own sends (error responses, from the connection's reading task) keep
            # their scheduler pass: its protocol code relies on the app's task running inside
            # such a send (without it a refused WebSocket handshake left its connection open).
            # An app's send returns at once; the app yields soon enough (keepstream's relay
            # waits for the next chunk).
            await trio.lowlevel.cancel_shielded_checkpoint()


class _KeepAlive:
    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = False


async def serve_connections(
    app: AppWrapper,
    config: HypercornConfig,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    close_trigger: Callable[[], Awaitable[Any]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``sock`` (already listening) until ``shutdown_trigger`` returns; then stop
    accepting and give open connections ``config.graceful_timeout`` to finish.

    Once ``close_trigger`` (if given) returns, keep-alive ends while accepting goes on: each
    HTTP/1.1 connection closes when its next response ends (a new one is still answered;
    HTTP/2 connections are left to Hypercorn's GOAWAY at shutdown). A drain
    sets it when it cuts its remaining streams: a connection closed at the end of its
    response costs Hypercorn less than one recycled for the next request and closed later by
    an idle-timeout task started for it (a drain of 1,000 streams spent about a fifth of its
    wind-down there). Hypercorn's own ``terminated`` would do the same but also close every
    new connection unanswered, so it is set only at shutdown, as before."""
    keep_alive = _KeepAlive()
    context = WorkerContext(None)
    state = ConnectionState({})
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    binds = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}"]

    async with trio.open_nursery() as connections:

        async def handle(stream: trio.SocketStream) -> None:
            try:
                server = LeanTCPServer(app, config, context, state, stream)  # type: ignore[arg-type]
                server.keep_alive = keep_alive
                await server
            except Exception:
                # Hypercorn's protocol code failed on this connection's bytes: end it alone.
                log.warning("keepstream: a connection failed in Hypercorn; closed it",
                            exc_info=True)
                with trio.move_on_after(1, shield=True):
                    await stream.aclose()

        async with trio.open_nursery() as accepting:
            accepting.start_soon(partial(trio.serve_listeners, handle, [listener],
                                         handler_nursery=connections))
            if close_trigger is not None:

                async def end_keep_alive(trigger: Callable[[], Awaitable[Any]]) -> None:
                    await trigger()
                    keep_alive.ended = True

                accepting.start_soon(end_keep_alive, close_trigger)
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
