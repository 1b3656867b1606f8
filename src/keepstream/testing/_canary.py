"""A canary listener: a loopback port that nothing may ever reach (:class:`Canary`).

Aim an attack at it (an absolute-form target, a ``Host`` header, a ``Location`` to follow, a
path that smuggles an authority) and assert ``canary.connections == 0``: the proxy never opened a
connection there. Every connection it does get is counted, then closed at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = ["Canary", "run_canary"]


@dataclass
class Canary:
    """A running canary on ``host:port``; get one from ``await nursery.start(run_canary)``.

    ``connections`` counts the TCP connections it accepted (each is closed at once).
    """

    port: int
    host: str = "127.0.0.1"
    connections: int = 0

    @property
    def listen(self) -> str:
        """``"HOST:PORT"``, the address to aim at (``127.0.0.1:PORT`` by default)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``"http://HOST:PORT"``, for a target, a ``Location`` or an upstream URL."""
        return f"http://{self.listen}"


async def run_canary(
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[Canary] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host`` (a free port), count every connection and close it; run until
    cancelled. ``task_status.started`` hands over the :class:`Canary`."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    canary = Canary(port=listeners[0].socket.getsockname()[1], host=host)

    async def handler(stream: trio.SocketStream) -> None:
        canary.connections += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(canary)
