"""Peer: a Starlette relay on uvicorn (``StreamingResponse`` over ``httpx.AsyncClient``).

Each request is forwarded to ``--upstream`` + the request target; each ``aiter_raw()`` chunk is
one item of the streaming response. No journal, no parsing. Needs
``pip install -e '.[bench]'``.

    python benchmarks/starlette_relay.py --bind 127.0.0.1:8083 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from _bench import pin_to
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                  "content-length", "proxy-connection"})


def make_app(upstream: str) -> Starlette:
    base = upstream.rstrip("/")
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(None, connect=10.0, pool=30.0),
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=2000))
        yield
        await state["client"].aclose()

    async def relay(request: Request) -> StreamingResponse:
        client = state["client"]
        target = request.url.path + ("?" + request.url.query if request.url.query else "")
        up = await client.send(client.build_request(request.method, base + target),
                               stream=True)
        headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(up.aiter_raw(), status_code=up.status_code, headers=headers,
                                 background=BackgroundTask(up.aclose))

    return Starlette(routes=[Route("/{tail:path}", relay, methods=["GET", "POST"])],
                     lifespan=lifespan)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bind", default="127.0.0.1:8083")
    p.add_argument("--upstream", required=True)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args()
    pin_to(args.cpu)
    host, _, port = args.bind.rpartition(":")
    print(f"listening on http://{args.bind}", flush=True)
    uvicorn.run(make_app(args.upstream), host=host, port=int(port), log_level="warning",
                access_log=False, backlog=2048)


if __name__ == "__main__":
    cli()
