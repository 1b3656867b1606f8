"""Embed keepstream in your own Trio ASGI service and transform a stream on its way through.

A plain ASGI service (no framework) served by Hypercorn's trio worker. Its route
``POST /shout`` calls ``proxy.open_stream("POST", "/v1/chat/completions", ...)``: keepstream
fetches the completion from the upstream and journals the raw upstream bytes, while the
service reads the same bytes from the stream handle, uppercases the LLM's tokens and streams
them to its own client as plain text.

* The raw body stays in the journal byte for byte (``GET /_keepstream/streams/<id>/body``,
  mounted here too), whatever the service does with it.
* If the service's client leaves, the handler leaves the ``open_stream`` block early, which
  keepstream counts as the client leaving: under the default ``on_disconnect = "finish"`` the
  fetch goes on into the journal.
* Shutdown: ``proxy.aclose()`` drains first (new streams get 503, running ones may finish for
  up to ``drain_timeout``), then Hypercorn stops, then ``open_proxy`` persists and returns.

Run it::

    python examples/embed_transform.py                       # starts a fake LLM upstream too
    python examples/embed_transform.py --upstream http://127.0.0.1:9000
    curl -N -X POST -d '{"stream":true}' http://127.0.0.1:8000/shout
"""

from __future__ import annotations

import argparse
import json
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

#: The upstream path every ``/shout`` request is sent to (routed by the ``/v1/`` route).
UPSTREAM_PATH = "/v1/chat/completions"
MAX_REQUEST_BYTES = 1024 * 1024


class TokenDecoder:
    """Incremental parser: OpenAI-style SSE bytes in, ``delta.content`` strings out.

    Lines may end with ``\\n`` or ``\\r\\n``; a blank line ends an event; ``data: [DONE]`` and
    events without content give nothing. Chunk boundaries may fall anywhere, even inside a
    multi-byte character: only whole lines are decoded.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the tokens of every event they complete."""
        self._buf += chunk
        tokens: list[str] = []
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end]).rstrip(b"\r")
            start = end + 1
            if not line:
                token = _content(b"\n".join(self._data))
                self._data = []
                if token:
                    tokens.append(token)
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        del self._buf[:start]
        return tokens


def _content(data: bytes) -> str | None:
    if not data or data == b"[DONE]":
        return None
    try:
        obj: Any = json.loads(data)
        content = obj["choices"][0]["delta"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def transform(token: str) -> str:
    """What the service does to each token: shout it."""
    return token.upper()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_text(send: Send, status: int, text: str,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body; None if the client left first. ``ValueError`` past the cap."""
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body += msg.get("body", b"")
        if len(body) > MAX_REQUEST_BYTES:
            raise ValueError(f"request body over {MAX_REQUEST_BYTES} bytes")
        if not msg.get("more_body", False):
            return bytes(body)


class ShoutService:
    """The service's own ASGI app: ``POST /shout`` plus keepstream's ``/_keepstream/`` API."""

    def __init__(self, proxy: keepstream.Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/_keepstream/"):
            # Records and journaled bodies, straight from keepstream's own app.
            await self.proxy.app(scope, receive, send)
        elif path == "/shout" and scope["method"] == "POST":
            await self._shout(scope, receive, send)
        else:
            await _send_text(send, 404, "try POST /shout\n")

    async def _shout(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive)
        except ValueError as exc:
            await _send_text(send, 413, f"{exc}\n")
            return
        if body is None:
            return  # the client left before sending its request
        # Forward the client's credentials and X-* headers (the fake upstream is steered by
        # X-Fake-*); keepstream drops hop-by-hop headers itself.
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() in (b"authorization", b"content-type") or
                   k.lower().startswith(b"x-")]
        try:
            async with self.proxy.open_stream("POST", UPSTREAM_PATH, headers=headers,
                                              body=body) as upstream:
                sid = [(b"keepstream-id", upstream.id.encode())]
                if upstream.status_code != 200:
                    await _send_text(send, 502, f"upstream answered {upstream.status_code}\n",
                                     sid)
                    return
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *sid]})
                read_all = await _relay(upstream, receive, send)
                status = await upstream.wait_finished() if read_all else None
        except keepstream.StreamRefused as exc:  # draining, too many streams, journal down
            await _send_text(send, exc.status, f"{exc.message}\n", [(b"retry-after", b"1")])
            return
        except keepstream.RequestRejected as exc:
            await _send_text(send, exc.status, f"{exc.message}\n")
            return
        if status == "completed":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # Otherwise (upstream failed, shutdown) return without ending the body: Hypercorn closes
        # the connection and the client sees a truncated response, never a fake clean end.


async def _relay(upstream: keepstream.StreamHandle, receive: Receive, send: Send) -> bool:
    """Send the transformed tokens; True if the stream was read to its end, False if the
    client left first (watched via ``http.disconnect``, since ``send`` never fails)."""
    decoder = TokenDecoder()
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        async for chunk in upstream:
            text = "".join(transform(t) for t in decoder.feed(chunk))
            if text:
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": True})
        nursery.cancel_scope.cancel()
        return True
    return False  # the watcher cancelled the relay: leaving open_stream now = client left


def make_config(upstream_url: str, journal_url: str = "memory:",
                drain_timeout: float = 5.0) -> keepstream.Config:
    """One route, ``/v1/`` -> the upstream's ``/v1/``."""
    return keepstream.Config(
        routes=(keepstream.Route(prefix="/v1/", upstream=upstream_url.rstrip("/") + "/v1/"),),
        server=keepstream.ServerConfig(drain_timeout=drain_timeout),
        journal=keepstream.JournalConfig(url=journal_url),
    )


async def run_shout_service(
    upstream_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    journal_url: str = "memory:",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :class:`ShoutService` until ``shutdown_trigger`` returns (or until cancelled).

    ``task_status.started()`` gets the service's URL (``http://127.0.0.1:PORT``).
    """
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

        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(partial(
                hypercorn.trio.serve, cast(ASGIFramework, ShoutService(proxy)), hc,
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
            await run_shout_service(upstream_url, host=host, port=port, journal_url=journal_url,
                                    shutdown_trigger=stop.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # stop the signal watcher and the fake upstream

        url: str = await nursery.start(service)
        print(f"embed_transform: listening on {url}", flush=True)
        print(f"  curl -N -X POST -d '{{}}' {url}/shout", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python examples/embed_transform.py [--upstream URL] [--port N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", help="LLM upstream origin (default: start a fake one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--journal", default="memory:", help="sqlite:///PATH or memory:")
    args = parser.parse_args(argv)
    trio.run(_main, args.upstream, args.host, args.port, args.journal)


if __name__ == "__main__":
    main()
