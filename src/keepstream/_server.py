"""``keepstream.serve``: the whole server with signal handling (DESIGN section 2).

::

    serve(config)
    └── open_proxy: journal writer + stream supervisor nursery
        └── nursery
            ├── signal receiver: 1st SIGTERM/SIGINT -> drain; 2nd -> interrupt now
            └── hypercorn.trio.serve(app, shutdown_trigger=<drained>)

The signal task only changes state; each stream persists itself in its own ``finally``.
Hypercorn's own signal handling is not used (it would cut streams at ``graceful_timeout``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._config import Config, parse_bind
from ._proxy import Proxy, open_proxy


def hypercorn_config(config: Config) -> HypercornConfig:
    host, port = parse_bind(config.server.bind)
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.keep_alive_timeout = config.server.keep_alive_timeout
    hc.graceful_timeout = config.server.persist_timeout + 0.5
    hc.accesslog = None
    hc.errorlog = "-"
    hc.loglevel = "WARNING"
    hc.h11_max_incomplete_size = 16 * 1024
    return hc


async def run_server(
    proxy: Proxy,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``proxy.app`` with Hypercorn until drained. Returns after the drain."""
    sup = proxy.supervisor
    drained = trio.Event()

    async def drain_then_stop() -> None:
        await sup.drain()
        drained.set()

    async with trio.open_nursery() as nursery:
        draining_started = False

        def start_drain() -> None:
            nonlocal draining_started
            if not draining_started:
                draining_started = True
                nursery.start_soon(drain_then_stop)

        async def signal_receiver(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        print(f"keepstream: {name}: draining", file=sys.stderr, flush=True)
                        start_drain()
                    else:
                        print(f"keepstream: {name} again: interrupting", file=sys.stderr,
                              flush=True)
                        sup.begin_drain()
                        sup.interrupt_all("second signal")

        async def external_trigger() -> None:
            assert shutdown_trigger is not None
            await shutdown_trigger()
            start_drain()

        if handle_signals:
            await nursery.start(signal_receiver)
        if shutdown_trigger is not None:
            nursery.start_soon(external_trigger)

        async def server(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(proxy.app, hypercorn_config(config),  # type: ignore[arg-type]
                                  shutdown_trigger=drained.wait, task_status=task_status)
            nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(server)
        task_status.started(binds)


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run keepstream until SIGTERM/SIGINT (or ``shutdown_trigger`` returns), then drain.

    ``task_status.started()`` receives the bound addresses (``["http://127.0.0.1:8080"]``).
    Signal handlers can only be installed from the main thread; pass ``handle_signals=False``
    when embedding elsewhere.
    """
    async with open_proxy(config) as proxy:
        await run_server(proxy, config, shutdown_trigger=shutdown_trigger,
                         handle_signals=handle_signals, task_status=task_status)
