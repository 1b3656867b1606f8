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
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import repr_socket_addr

log = logging.getLogger("keepstream")


async def serve_connections(
    app: AppWrapper,
    config: HypercornConfig,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``sock`` (already listening) until ``shutdown_trigger`` returns; then stop
    accepting and give open connections ``config.graceful_timeout`` to finish."""
    context = WorkerContext(None)
    state = ConnectionState({})
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    binds = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}"]

    async with trio.open_nursery() as connections:

        async def handle(stream: trio.SocketStream) -> None:
            try:
                await TCPServer(app, config, context, state, stream)  # type: ignore[arg-type]
            except Exception:
                # Hypercorn's protocol code failed on this connection's bytes: end it alone.
                log.warning("keepstream: a connection failed in Hypercorn; closed it",
                            exc_info=True)
                with trio.move_on_after(1, shield=True):
                    await stream.aclose()

        async with trio.open_nursery() as accepting:
            accepting.start_soon(partial(trio.serve_listeners, handle, [listener],
                                         handler_nursery=connections))
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
