"""``create_app``: keepstream as an ASGI app with its own lifespan, for ``hypercorn module:app``.

The supervisor and the journal writer live in the lifespan task. Under the Hypercorn CLI,
Hypercorn owns the signals: see docs/operations.md for what differs from ``keepstream serve``.
"""

from __future__ import annotations

import os
from typing import Any

from ._app import Receive, Scope, Send, send_error
from ._config import Config
from ._proxy import Proxy, open_proxy


class LifespanApp:
    """ASGI app that runs :func:`open_proxy` for the lifespan of the server."""

    def __init__(self, config: Config | None = None) -> None:
        self._config = config
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


def create_app(config: Config | None = None) -> Any:
    """An ASGI app with lifespan. ``config=None``: read ``KEEPSTREAM_CONFIG`` at start-up."""
    return LifespanApp(config)


__all__ = ["LifespanApp", "create_app"]
