"""Peer: the typical aiohttp streaming relay (aiohttp server + one ClientSession).

Each request is forwarded to ``--upstream`` + the request target; each chunk the client
session yields (``iter_any()``) is written with one ``StreamResponse.write``. No journal, no
parsing. Needs ``pip install -e '.[bench]'``.

    python benchmarks/aiohttp_relay.py --bind 127.0.0.1:8082 --upstream http://127.0.0.1:9000

Prints ``listening on http://...`` once bound; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from _bench import pin_to
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                  "content-length", "proxy-connection"})


async def main(bind: str, upstream: str) -> None:
    base = upstream.rstrip("/")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=2000, limit_per_host=2000),
        timeout=aiohttp.ClientTimeout(total=None, connect=10), auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        async with session.request(request.method, base + request.raw_path) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = bind.rpartition(":")
    site = web.TCPSite(runner, host, int(port), backlog=2048)
    await site.start()
    print(f"listening on http://{bind}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bind", default="127.0.0.1:8082")
    p.add_argument("--upstream", required=True)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args()
    pin_to(args.cpu)
    asyncio.run(main(args.bind, args.upstream))


if __name__ == "__main__":
    cli()
