"""``create_app``: keepstream as an ASGI app with its own lifespan, for ``hypercorn module:app``.

The supervisor and the journal writer live in the lifespan task. Under the Hypercorn CLI,
Hypercorn owns the signals: see docs/operations.md for what differs from ``keepstream serve``.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Any

from ._app import Receive, Scope, Send, send_error
from ._config import Config
from ._proxy import Proxy, open_proxy

log = logging.getLogger("keepstream")


def set_stall_timeout_on_listeners(seconds: float) -> int:
    """Set ``TCP_USER_TIMEOUT`` on every listening TCP socket of this process; return how many.

    Under the Hypercorn CLI keepstream does not create the listening socket, so it tunes the
    ones Hypercorn made: accepted connections inherit the option, and the kernel then drops a
    client whose data stays unacknowledged (it stopped reading) for ``seconds``. Without it such
    a client holds Hypercorn's shielded write, and its shutdown, for ever. Linux only.
    """
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        return 0
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    tuned = 0
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                    sock.type == socket.SOCK_STREAM and \
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                max(1, int(seconds * 1000)))
                tuned += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays Hypercorn's
    return tuned


class LifespanApp:
    """ASGI app that runs :func:`open_proxy` for the lifespan of the server.

    ``tune_listeners``: at start-up, set ``client_stall_timeout`` as ``TCP_USER_TIMEOUT`` on the
    process's listening sockets (:func:`set_stall_timeout_on_listeners`); ``keepstream.asgi:app``
    does, for the Hypercorn CLI.
    """

    def __init__(self, config: Config | None = None, *, tune_listeners: bool = False) -> None:
        self._config = config
        self._tune_listeners = tune_listeners
        self.proxy: Proxy | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            path = os.environ.get("KEEPSTREAM_CONFIG")
            if not path:
                from ._errors import ConfigError

                raise ConfigError("KEEPSTREAM_CONFIG", "set it to the path of a TOML config")
            self._config = Config.from_toml(path)
        return self._config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        proxy = self.proxy
        if proxy is None:
            if scope["type"] == "http":
                await send_error(send, 503, "keepstream is not started (no lifespan?)")
            return
        await proxy.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        msg = await receive()
        if msg["type"] != "lifespan.startup":
            return
        try:
            config = self.config
            async with open_proxy(config) as proxy:
                if self._tune_listeners:
                    n = set_stall_timeout_on_listeners(config.server.client_stall_timeout)
                    if not n:
                        log.warning("keepstream: no listening socket to set "
                                    "client_stall_timeout on; stalled clients can hold "
                                    "shutdown")
                self.proxy = proxy
                await send({"type": "lifespan.startup.complete"})
                msg = await receive()
                # lifespan.shutdown: Hypercorn sends it after every connection ended.
                proxy.supervisor.begin_drain()
        except Exception as exc:
            if self.proxy is None:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            raise
        finally:
            self.proxy = None
        await send({"type": "lifespan.shutdown.complete"})


def create_app(config: Config | None = None, *, tune_listeners: bool = False) -> Any:
    """An ASGI app with lifespan. ``config=None``: read ``KEEPSTREAM_CONFIG`` at start-up.

    ``tune_listeners=True`` sets ``client_stall_timeout`` on the process's listening sockets at
    start-up (for a server that made its own sockets, as the Hypercorn CLI does; it touches
    every listening TCP socket of the process)."""
    return LifespanApp(config, tune_listeners=tune_listeners)


__all__ = ["LifespanApp", "create_app"]
