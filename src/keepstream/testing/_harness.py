"""Run keepstream in-process on a loopback port (real Hypercorn or the lean engine, real
sockets)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .._config import Config
from .._proxy import Proxy, _only, open_proxy
from .._server import run_server


@dataclass
class RunningKeepstream:
    """A keepstream served on ``127.0.0.1:port`` inside the test's own Trio run."""

    proxy: Proxy
    url: str
    port: int
    _stop: trio.Event

    @property
    def config(self) -> Config:
        """The config the proxy runs with (routes point at the test's upstream)."""
        return self.proxy.config

    def stop(self) -> None:
        """Begin the graceful drain (as a SIGTERM would); the block then ends."""
        self._stop.set()

    async def record(self, stream_id: str) -> dict[str, object] | None:
        """The stream's record as JSON (from the live stream or the journal)."""
        from .._record import record_json

        live = self.proxy.supervisor.live.get(stream_id)
        row = live.record.row() if live is not None else await \
            self.proxy.supervisor.writer.get(stream_id)
        return None if row is None else record_json(row)

    async def body(self, stream_id: str) -> bytes:
        """The journaled body bytes of a stream."""
        return await self.proxy.supervisor.writer.read_body(stream_id)

    async def wait_terminal(self, stream_id: str) -> dict[str, object]:
        """Wait until the stream's record is terminal and persisted; return it."""
        live = self.proxy.supervisor.live.get(stream_id)
        if live is not None:
            await live.done.wait()
        rec = await self.record(stream_id)
        assert rec is not None, f"no record for {stream_id}"
        return rec

    async def wait_all_terminal(self) -> None:
        """Wait until no stream is live."""
        await self.proxy.supervisor.wait_idle()


@asynccontextmanager
async def run_keepstream(config: Config) -> AsyncIterator[RunningKeepstream]:
    """Serve ``config`` on 127.0.0.1 with an ephemeral port for the duration of the block.

    ``server.bind`` is replaced by ``127.0.0.1:0``. Leaving the block drains like a SIGTERM.
    ``KEEPSTREAM_ENGINE`` in the environment (``hypercorn`` or ``lean``) replaces
    ``server.engine``, as it does for ``keepstream serve``: one suite can run against both.
    """
    engine = os.environ.get("KEEPSTREAM_ENGINE") or config.server.engine
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, bind="127.0.0.1:0", engine=engine)
    )
    stop = trio.Event()
    body_exc: BaseException | None = None
    async with open_proxy(config) as proxy:
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    lambda task_status: run_server(
                        proxy, config, shutdown_trigger=stop.wait, handle_signals=False,
                        task_status=task_status,
                    )
                )
                url = binds[0]
                port = int(url.rsplit(":", 1)[1])
                try:
                    yield RunningKeepstream(proxy, url, port, stop)
                except BaseException as exc:
                    body_exc = exc
                    raise
                finally:
                    stop.set()
        except BaseExceptionGroup as group:
            # The block's own exception leaves unchanged, not wrapped in our nursery's group.
            if body_exc is not None and _only(group, body_exc):
                raise body_exc from None
            raise
