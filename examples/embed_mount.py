"""Mount keepstream's ASGI app under ``/llm/`` inside your own ASGI app.

A tiny dispatcher (no framework) owns the paths: ``/`` is its own page, ``/llm/...`` goes to
``proxy.app``. keepstream's app needs no lifespan (the proxy is already running: it lives in
``open_proxy``, around the server). The dispatcher passes the path unchanged and sets
``scope["root_path"] = "/llm"`` as the ASGI spec asks of a mount; keepstream strips the
``root_path`` from the path before routing, so ``/llm/v1/chat/completions`` is routed as
``/v1/chat/completions`` and ``/llm/_keepstream/streams/<id>`` serves the journal. (A
dispatcher that strips the prefix from ``path`` itself works too.)

Run it::

    python examples/embed_mount.py                       # starts a fake LLM upstream too
    python examples/embed_mount.py --upstream http://127.0.0.1:9000
    curl -N http://127.0.0.1:8000/llm/v1/chat/completions
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, cast

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.typing import ASGIFramework

import keepstream
from keepstream.testing import FakeUpstream, run_fake_upstream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MOUNT = "/llm"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_text(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Dispatcher:
    """The outer app: its own routes, and ``llm`` mounted at :data:`MOUNT`."""

    def __init__(self, llm: ASGIApp, mount: str = MOUNT) -> None:
        self.llm = llm
        self.mount = mount

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)  # the outer app's; keepstream needs none
            return
        if scope["type"] != "http":
            return
        root: str = scope.get("root_path", "")
        path: str = scope["path"]
        rel = path[len(root):] if root and path.startswith(root) else path
        if rel == self.mount or rel.startswith(self.mount + "/"):
            # Path unchanged, root_path extended: keepstream routes what follows the mount.
            await self.llm({**scope, "root_path": root + self.mount}, receive, send)
        elif rel == "/":
            await _send_text(send, 200, f"the outer app; keepstream is mounted at {self.mount}/\n")
        else:
            await _send_text(send, 404, "not found\n")


def make_config(upstream_url: str, journal_url: str = "memory:",
                drain_timeout: float = 5.0) -> keepstream.Config:
    """One route, ``/v1/`` -> the upstream's ``/v1/`` (``/llm/v1/...`` from outside)."""
    return keepstream.Config(
        routes=(keepstream.Route(prefix="/v1/", upstream=upstream_url.rstrip("/") + "/v1/"),),
        server=keepstream.ServerConfig(drain_timeout=drain_timeout),
        journal=keepstream.JournalConfig(url=journal_url),
    )


async def run_mounted(
    upstream_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    journal_url: str = "memory:",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :class:`Dispatcher` with ``proxy.app`` at ``/llm`` until ``shutdown_trigger``
    returns (or until cancelled). ``task_status.started()`` gets the URL of the outer app."""
    config = make_config(upstream_url, journal_url)
    hc = hypercorn.config.Config()
    hc.bind = [f"{host}:{port}"]
    hc.accesslog = None
    hc.graceful_timeout = 1.0
    async with keepstream.open_proxy(config) as proxy:

        async def drain_then_stop() -> None:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            await proxy.aclose()  # drain (bounded), then let Hypercorn close the connections

        app = Dispatcher(proxy.app)
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(partial(
                hypercorn.trio.serve, cast(ASGIFramework, app), hc,
                shutdown_trigger=drain_then_stop,
            ))
            task_status.started(binds[0])


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _main(upstream_url: str | None, host: str, port: int, journal_url: str) -> None:
    async with trio.open_nursery() as nursery:
        if upstream_url is None:
            fake: FakeUpstream = await nursery.start(run_fake_upstream)
            upstream_url = fake.url
            print(f"fake LLM upstream on {upstream_url}", flush=True)
        stop = trio.Event()
        nursery.start_soon(_stop_on_signal, stop)

        async def service(task_status: trio.TaskStatus[str]) -> None:
            await run_mounted(upstream_url, host=host, port=port, journal_url=journal_url,
                              shutdown_trigger=stop.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # stop the signal watcher and the fake upstream

        url: str = await nursery.start(service)
        print(f"embed_mount: listening on {url}", flush=True)
        print(f"  curl -N {url}{MOUNT}/v1/chat/completions", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python examples/embed_mount.py [--upstream URL] [--port N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", help="LLM upstream origin (default: start a fake one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--journal", default="memory:", help="sqlite:///PATH or memory:")
    args = parser.parse_args(argv)
    trio.run(_main, args.upstream, args.host, args.port, args.journal)


if __name__ == "__main__":
    main()
