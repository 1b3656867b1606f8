"""The baseline: the smallest useful streaming relay on keepstream's own stack.

Hypercorn's trio worker (``hypercorn.trio.serve``, in this process) and one
``httpx.AsyncClient``. Each request is forwarded to ``--upstream`` + the request target; each
chunk of ``aiter_raw()`` is relayed with one ``send()``. No journal, no SSE parsing, no
disconnect watcher, no header rules beyond dropping hop-by-hop headers: this is the cost floor
keepstream is compared against.

    python benchmarks/minimal_relay.py --bind 127.0.0.1:8081 --upstream http://127.0.0.1:9000

Prints ``listening on http://...`` once bound; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import httpx
import trio
from _bench import pin_to
from hypercorn.config import Config
from hypercorn.trio import serve

Message = MutableMapping[str, Any]
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                  b"upgrade", b"content-length", b"proxy-connection"})


def make_app(upstream: str, client: httpx.AsyncClient) -> Any:
    base = upstream.rstrip("/")

    async def app(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        url = base + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        async with client.stream(scope["method"], url) as resp:
            headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": headers})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def main(bind: str, upstream: str) -> None:
    client = httpx.AsyncClient(
        trust_env=False,
        limits=httpx.Limits(max_connections=2000, max_keepalive_connections=2000),
        timeout=httpx.Timeout(None, connect=10.0, pool=30.0),
    )
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    async with client, trio.open_nursery() as nursery:
        stop = trio.Event()

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(on_signal)
        binds = await nursery.start(
            partial(serve, make_app(upstream, client), config, shutdown_trigger=stop.wait))
        for b in binds:
            print(f"listening on {b}", flush=True)
        await stop.wait()


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bind", default="127.0.0.1:8081")
    p.add_argument("--upstream", required=True)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args()
    pin_to(args.cpu)
    trio.run(main, args.bind, args.upstream)
    sys.exit(0)


if __name__ == "__main__":
    cli()
