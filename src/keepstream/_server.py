"""``keepstream.serve``: the whole server with signal handling (DESIGN section 2).

::

    serve(config)
    └── open_proxy: journal writer + stream supervisor nursery
        └── nursery
            ├── signal receiver: 1st SIGTERM/SIGINT -> drain; 2nd -> interrupt now
            └── serve_connections(app, shutdown_trigger=<drained>)  (Hypercorn's protocols,
                each connection contained: see _connections.py), or with
                ``engine = "lean"`` serve_lean (keepstream's own HTTP/1.1 engine, _h1.py)

The signal task only changes state; each stream persists itself in its own ``finally``.
Hypercorn's own signal handling is not used (it would cut streams at ``graceful_timeout``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app

from ._config import Config, parse_bind
from ._connections import serve_connections
from ._h1 import serve_lean
from ._proxy import Proxy, open_proxy

#: The hard exit after a drain comes at least this long before ``stop_grace`` runs out.
HARD_EXIT_LEAD = 0.25


#: Listen backlog (the kernel caps it at net.core.somaxconn): a burst of thousands of clients
#: (reconnecting after a deploy, say) must not overflow it; 1,024 did with 9,500.
BACKLOG = 4096


def create_listen_socket(config: Config, backlog: int = BACKLOG) -> socket.socket:
    """The listening socket, created by keepstream and handed to Hypercorn.

    ``TCP_USER_TIMEOUT`` (inherited by every accepted connection) makes the kernel drop a client
    whose unacknowledged data, or zero-window probes, go unanswered for ``client_stall_timeout``.
    That is what releases a ``send()`` stuck on a client that stopped reading without closing:
    Hypercorn shields its socket writes, so no cancellation can (DESIGN section 5).
    """
    host, port = parse_bind(config.server.bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(1, int(config.server.client_stall_timeout * 1000)))
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


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
    hc.backlog = BACKLOG
    return hc


async def run_server(
    proxy: Proxy,
    config: Config,
    *,
    sock: socket.socket | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = True,
    hard_exit_after_drain: float | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``proxy.app`` with Hypercorn until drained. Returns after the drain.

    ``sock``: a listening socket to serve on (default: one made by :func:`create_listen_socket`,
    closed on return). ``hard_exit_after_drain`` (the CLI only): if Hypercorn has not finished
    that many seconds after every record was persisted (a connection stuck in a shielded write to
    a client that stopped reading), end the process with status 0 rather than miss the
    platform's SIGKILL deadline. Nothing is lost by it: the drain already persisted every record.
    """
    sup = proxy.supervisor
    drained = trio.Event()
    own_sock = sock is None
    listen = create_listen_socket(config) if sock is None else sock

    async def drain_then_stop() -> None:
        await sup.drain()
        drained.set()
        if hard_exit_after_drain is not None:
            # Never later than just before the platform's SIGKILL (stop_grace after the
            # signal), whatever hard_exit_after_drain says.
            assert sup.drain_started is not None
            deadline = sup.drain_started + config.server.stop_grace - HARD_EXIT_LEAD
            delay = max(0.0, min(hard_exit_after_drain, deadline - trio.current_time()))
            timer = threading.Timer(delay, _hard_exit)
            timer.daemon = True
            timer.start()

    try:
        async with trio.open_nursery() as nursery:
            draining_started = False

            def start_drain() -> None:
                nonlocal draining_started
                sup.begin_drain()  # readiness turns false now, not on the next tick
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
                            start_drain()
                            print(f"keepstream: {name}: draining", file=sys.stderr, flush=True)
                        else:
                            sup.interrupt_all("second signal")
                            print(f"keepstream: {name} again: interrupting", file=sys.stderr,
                                  flush=True)

            async def external_trigger() -> None:
                assert shutdown_trigger is not None
                await shutdown_trigger()
                start_drain()

            if handle_signals:
                await nursery.start(signal_receiver)
            if shutdown_trigger is not None:
                nursery.start_soon(external_trigger)

            async def server(*, task_status: trio.TaskStatus[list[str]]) -> None:
                hc = hypercorn_config(config)
                if config.server.engine == "lean":
                    await serve_lean(
                        proxy.app, listen, keep_alive_timeout=hc.keep_alive_timeout,
                        graceful_timeout=hc.graceful_timeout, shutdown_trigger=drained.wait,
                        close_trigger=sup.cutting.wait, task_status=task_status,
                    )
                else:
                    await serve_connections(
                        wrap_app(proxy.app, hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                        hc, listen, shutdown_trigger=drained.wait, close_trigger=sup.cutting.wait,
                        task_status=task_status,
                    )
                nursery.cancel_scope.cancel()

            binds: list[str] = await nursery.start(server)
            task_status.started(binds)
    finally:
        if own_sock:
            listen.close()


def _hard_exit() -> None:
    print("keepstream: connections still open after the drain; exiting", file=sys.stderr,
          flush=True)
    os._exit(0)


async def serve(
    config: Config,
    *,
    sock: socket.socket | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = True,
    recover: bool = True,
    hard_exit_after_drain: float | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run keepstream until SIGTERM/SIGINT (or ``shutdown_trigger`` returns), then drain.

    ``task_status.started()`` receives the bound addresses (``["http://127.0.0.1:8080"]``).
    Signal handlers can only be installed from the main thread; pass ``handle_signals=False``
    when embedding elsewhere. ``recover=False`` skips start-up recovery (worker processes: the
    parent recovers once, before any worker starts).
    """
    async with open_proxy(config, recover=recover) as proxy:
        await run_server(proxy, config, sock=sock, shutdown_trigger=shutdown_trigger,
                         handle_signals=handle_signals,
                         hard_exit_after_drain=hard_exit_after_drain, task_status=task_status)
