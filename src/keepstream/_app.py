"""The ASGI application: admin endpoints under ``/_keepstream/`` and the proxied routes.

Per proxied request (DESIGN section 2): validate before any upstream contact (I9), read the
request body (capped), ask the supervisor for a stream, then relay it in a nursery that holds the
downstream writer (this task) and the disconnect watcher (``receive()`` -> ``http.disconnect``).
Hypercorn never raises on a ``send()`` after the client left, so the watcher is the only reliable
signal (I3). Whatever was waiting in the live buffer is sent in one ``send()`` (coalescing), and a
lone chunk is sent at once. A server that offers the direct path (``keepstream.direct``, the lean
engine) watches the client itself: the relay is then this task alone, parked in the server while
the stream task writes new chunks straight to the client's socket.

A response is ended cleanly (final empty body) only when the stream is ``completed``. Otherwise
the app returns without ending it, and Hypercorn closes the connection without the terminating
chunk: a client never sees a clean end of body that fakes completion.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import trio

from ._config import Config, upstream_credentials
from ._record import record_json
from ._resume import EventRewriter, EventSkipper, parse_ks_id, read_stream
from ._rules import (
    RequestRejected,
    check_head_size,
    check_request,
    filter_request_headers,
    match_route,
    normalize_path,
)
from ._state import Ending, Status
from ._supervisor import (
    MAX_SEND,
    Direct,
    Lagging,
    LiveStream,
    StreamRefused,
    Subscriber,
    Supervisor,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The scope extension through which a server offers the direct path (a
#: :class:`~keepstream._supervisor.Direct`).
DIRECT_EXTENSION = "keepstream.direct"

_STREAM_PATH = re.compile(r"^/_keepstream/streams/([0-9a-f]{1,64})(/body|/cancel)?$")
_JSON = [(b"content-type", b"application/json")]


async def send_json(
    send: Send, status: int, payload: object, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send, status: int, message: str, *, stream_id: str | None = None,
    retry_after: int | None = None, close: bool = False,
) -> None:
    """A JSON error answer. ``close`` (HTTP/1.x only) adds ``Connection: close``: Hypercorn
    then ends the connection after it, so nothing pipelined behind a refused request is
    parsed as a request of its own."""
    extra: list[tuple[bytes, bytes]] = []
    if close:
        extra.append((b"connection", b"close"))
    payload: dict[str, object] = {"error": message, "status": status}
    if stream_id is not None:
        extra.append((b"keepstream-id", stream_id.encode()))
        payload["keepstream_id"] = stream_id
    if retry_after is not None:
        extra.append((b"retry-after", str(retry_after).encode()))
    await send_json(send, status, payload, extra)


def _client_key_ok(headers: list[tuple[bytes, bytes]], keys: frozenset[str]) -> bool:
    value = _header(headers, b"authorization")
    if value is None or value[:7].lower() != b"bearer ":
        return False
    return hashlib.sha256(value[7:].strip()).hexdigest() in keys


def _body_head(sid: str) -> Message:
    return {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"application/octet-stream"),
                        (b"cache-control", b"no-store"), (b"keepstream-id", sid.encode())]}


def credential_hash(value: bytes | None) -> str | None:
    """What the journal keeps of a caller's credential: its SHA-256, never the value."""
    if not value:
        return None
    return hashlib.sha256(value).hexdigest()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


class KeepstreamApp:
    """ASGI app bound to one supervisor (``proxy.app``). No lifespan needed."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.config: Config = supervisor.config
        self._prefixes = [r.prefix for r in self.config.routes]
        self._cred_header = self.config.server.credential_header.encode()
        # Upstream credentials, read once at start-up from the environment (never journaled,
        # never in the config file).
        self._upstream_auth = upstream_credentials(self.config)
        self._client_keys = {r.prefix: frozenset(r.client_keys_sha256)
                             for r in self.config.routes if r.client_keys_sha256}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _trivial_lifespan(receive, send)
            return
        if kind == "websocket":
            # Not proxied: refuse the handshake (Hypercorn answers 403) rather than leave it.
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        path: str = scope["path"]
        raw_path: bytes = scope.get("raw_path") or path.encode()
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
            if raw_path.startswith(root.encode()):
                raw_path = raw_path[len(root):] or b"/"
        if path.startswith("/_keepstream/"):
            await self._admin(scope, path, receive, send)
            return
        await self._proxy(scope, path, raw_path, receive, send)

    # -- admin endpoints ------------------------------------------------------------------

    async def _admin(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method = scope["method"]
        sup = self.supervisor
        if path == "/_keepstream/healthz":
            await send_json(send, 200, {"status": "ok"})
            return
        if path == "/_keepstream/readyz":
            if sup.draining:
                await send_error(send, 503, "draining", retry_after=1)
            elif sup.writer.degraded:
                await send_error(send, 503, "journal cannot write", retry_after=1)
            else:
                await send_json(send, 200, {"status": "ready"})
            return
        if path == "/_keepstream/metrics":
            await self._metrics(send)
            return
        m = _STREAM_PATH.match(path)
        if m is None:
            await send_error(send, 404, "no such keepstream endpoint")
            return
        sid, tail = m.group(1), m.group(2)
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        live = sup.live.get(sid)
        row = live.record.row() if live is not None else await sup.writer.get(sid)
        if row is None or not self._may_access(row, headers):
            # Unknown and foreign ids look the same.
            await send_error(send, 404, "no such stream")
            return
        if tail == "/cancel":
            if method != "POST":
                await send_error(send, 405, "use POST")
                return
            if live is not None:
                live.stop(Ending.CANCEL_REQUESTED, "cancel endpoint")
                with trio.move_on_after(self.config.server.persist_timeout + 0.5):
                    await live.done.wait()
                row = live.record.row()
            await send_json(send, 200, record_json(row))
            return
        if method not in ("GET", "HEAD"):
            await send_error(send, 405, "use GET")
            return
        if tail == "/body":
            await self._body(scope, sid, headers, send)
            return
        await send_json(send, 200, record_json(row))

    def _may_access(self, row: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> bool:
        """The creator's credential, or the admin's. A stream created without a credential is
        reachable by its id alone (the id carries 80 random bits)."""
        caller = credential_hash(_header(headers, self._cred_header))
        admin = self.config.server.admin_token_sha256
        if admin and caller == admin:
            return True
        owner = row.get("owner")
        return owner is None or owner == caller

    async def _body(
        self, scope: Scope, sid: str, headers: list[tuple[bytes, bytes]], send: Send
    ) -> None:
        """The journaled body, then the live tail while the stream is open, then a proper end.

        Start point: ``?offset=<byte>``, ``?after=<event seq>``, or ``Last-Event-ID`` (a
        keepstream id ``ks1.<id>.<seq>`` or the upstream's own event id).
        """
        sup = self.supervisor
        if not sup.writer.backend.stores_bodies and sid not in sup.live:
            await send_error(send, 410, "journal 'none' keeps no bodies")
            return
        try:
            offset = _query_int(scope, "offset")
            after = _query_int(scope, "after")
        except RequestRejected as exc:
            await send_error(send, exc.status, exc.message)
            return
        skipper: EventSkipper | None = None
        last = _header(headers, b"last-event-id")
        if after:
            skipper = EventSkipper(after_seq=after)
        elif last:
            text = last.decode("latin-1")
            parsed = parse_ks_id(text)
            if parsed is not None and parsed[0] != sid:
                await send_error(send, 400, "Last-Event-ID names another stream")
                return
            skipper = EventSkipper(after_seq=parsed[1]) if parsed else EventSkipper(after_id=text)
        if skipper is not None:
            offset = 0
        live = sup.live.get(sid)
        if live is None and skipper is None:
            row = await sup.writer.get(sid)
            if row is not None and offset > row["bytes"]:
                await send_error(send, 416, f"offset {offset} is past the body's end "
                                            f"({row['bytes']} bytes)")
                return
        started = skipper is None
        if started:
            await send(_body_head(sid))
        async for data in read_stream(sup, sid, offset):
            out = skipper.feed(data) if skipper is not None else data
            if out:
                if not started:
                    started = True
                    await send(_body_head(sid))
                await send({"type": "http.response.body", "body": out, "more_body": True})
        if not started:
            assert skipper is not None
            if not skipper.found:
                # A resume point that is gone (pruned) or never existed: a clear error, never
                # a silent restart from the beginning.
                await send_error(send, 410, "resume point not found in this stream's journal")
                return
            await send(_body_head(sid))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _metrics(self, send: Send) -> None:
        sup = self.supervisor
        lines = [
            "# HELP keepstream_streams_started_total Streams accepted.",
            "# TYPE keepstream_streams_started_total counter",
            f"keepstream_streams_started_total {sup.started_total}",
            "# HELP keepstream_streams_ended_total Streams persisted with a terminal status.",
            "# TYPE keepstream_streams_ended_total counter",
        ]
        for status in Status:
            if status is not Status.OPEN:
                n = sup.ended_total.get(str(status), 0)
                lines.append(f'keepstream_streams_ended_total{{status="{status}"}} {n}')
        lines += [
            "# HELP keepstream_streams_live Streams running now.",
            "# TYPE keepstream_streams_live gauge",
            f"keepstream_streams_live {len(sup.live)}",
            "# HELP keepstream_draining 1 while the process drains.",
            "# TYPE keepstream_draining gauge",
            f"keepstream_draining {int(sup.draining)}",
            "# HELP keepstream_journal_write_failures_total Failed journal transactions.",
            "# TYPE keepstream_journal_write_failures_total counter",
            f"keepstream_journal_write_failures_total {sup.writer.failures}",
        ]
        body = ("\n".join(lines) + "\n").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- proxied routes -------------------------------------------------------------------

    async def _proxy(
        self, scope: Scope, path: str, raw_path: bytes, receive: Receive, send: Send
    ) -> None:
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        close = scope.get("http_version") in ("1.0", "1.1")
        if len(headers) > self.config.server.max_headers:
            await send_error(send, 431, f"more than {self.config.server.max_headers} headers",
                             close=close)
            return
        try:
            check_head_size(raw_path, scope.get("query_string", b""), headers)
            if scope.get("http_version") == "1.0" and \
                    _header(headers, b"transfer-encoding") is not None:
                # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
                raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
            check_request(method, raw_path, headers)
            raw_only = raw_path.split(b"?", 1)[0]
            safe_path = normalize_path(raw_only)
            idx = match_route(self._prefixes, safe_path)
            if idx is None:
                raise RequestRejected(404, "no route for this path")
            route = self.config.routes[idx]
            url = self.supervisor.upstream_url(route, safe_path, scope.get("query_string", b""))
        except RequestRejected as exc:
            await send_error(send, exc.status, exc.message, close=close)
            return
        keys = self._client_keys.get(route.prefix)
        if keys is not None and not _client_key_ok(headers, keys):
            extra = [(b"www-authenticate", b'Bearer realm="keepstream"')]
            if close:
                extra.append((b"connection", b"close"))
            await send_json(send, 401, {"error": "a valid client key is required", "status": 401},
                            extra)
            return
        if self.supervisor.writer.degraded:
            # Fail closed: a stream keepstream cannot record is not started.
            await send_error(send, 503, "the journal cannot record new streams", retry_after=1,
                             close=close)
            return
        body = await self._read_body(headers, receive, send, close)
        if body is None:
            return
        if route.resumable:
            last = _header(headers, b"last-event-id")
            resume = parse_ks_id(last.decode("latin-1")) if last else None
            if resume is not None:
                await self._resume(route.prefix, resume[0], resume[1], headers, receive, send)
                return
        detached = _prefers_async(headers)
        upstream_headers = filter_request_headers(headers)
        if keys is not None or route.prefix in self._upstream_auth:
            # The client's key is for keepstream only; the upstream gets its own credential.
            upstream_headers = [(k, v) for k, v in upstream_headers if k != b"authorization"]
            if route.prefix in self._upstream_auth:
                upstream_headers.append((b"authorization", self._upstream_auth[route.prefix]))
        try:
            stream = await self.supervisor.start_stream(
                route, method, safe_path, url, upstream_headers, body,
                detached=detached, owner=credential_hash(_header(headers, self._cred_header)),
                # Not through Hypercorn: its client's FIN reaches the app a few scheduler
                # passes after the request (through its reader task and receive()), and a
                # request written sooner can have its answer first; a client that half-closes
                # right after its request must still count as gone before any response
                # (docs/flow.md). The lean engine reads the client at the relay's park.
                send_early=detached or DIRECT_EXTENSION in scope.get("extensions", {}),
            )
        except StreamRefused as exc:
            await send_error(send, exc.status, exc.message, retry_after=exc.retry_after,
                             close=close)
            return
        del headers, upstream_headers, body  # the upstream request holds what it needs
        sid = stream.record.id
        if detached:
            await send_json(send, 202, record_json(stream.record.row()), [
                (b"location", (quote(scope.get("root_path", "")) +
                               f"/_keepstream/streams/{sid}").encode("ascii")),
                (b"keepstream-id", sid.encode()),
                (b"preference-applied", b"respond-async"),
            ])
            return
        await self._relay(stream, receive, send, scope)

    async def _resume(
        self, prefix: str, sid: str, seq: int, headers: list[tuple[bytes, bytes]],
        receive: Receive, send: Send,
    ) -> None:
        """A reconnect with a keepstream ``Last-Event-ID``: events after ``seq``, from the
        journal and then the live tail; no new upstream request."""
        sup = self.supervisor
        live = sup.live.get(sid)
        row = live.record.row() if live is not None else await sup.writer.get(sid)
        if row is None or row["route"] != prefix or not self._may_access(row, headers):
            await send_error(send, 404, "no such stream to resume")
            return
        if live is None and not sup.writer.backend.stores_bodies:
            await send_error(send, 410, "journal 'none' keeps no bodies to resume from")
            return
        if live is None and seq >= row["events"]:
            # Nothing left to send: 204 tells an EventSource to stop reconnecting.
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(b"keepstream-id", sid.encode())]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        server = self.config.server
        rewriter = EventRewriter(sid, skip=seq, max_line_bytes=server.max_line_bytes,
                                 max_event_bytes=server.max_event_bytes)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
            (b"keepstream-id", sid.encode())]})
        watched = _EndWatch(send)
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not watched.ending:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            async with aclosing(read_stream(sup, sid, 0)) as chunks:
                async for data in chunks:
                    out = rewriter.feed(data)
                    if out:
                        await watched({"type": "http.response.body", "body": out,
                                       "more_body": True})
                    if rewriter.overflowed:
                        nursery.cancel_scope.cancel()  # cut: see EventRewriter.feed
                        return
            final = live.record.row() if live is not None else await sup.writer.get(sid)
            status = None if final is None else final["status"]
            if status == Status.INTERRUPTED and live is not None:
                # Cut by this process's shutdown while the reader followed it: where to resume.
                with trio.move_on_after(self.config.server.persist_timeout, shield=True):
                    await watched({"type": "http.response.body",
                                   "body": reconnect_event(live, rewriter), "more_body": False})
            elif status == Status.COMPLETED:
                await watched({"type": "http.response.body", "body": b"", "more_body": False})
            # Any other ending: no clean end of body (Hypercorn cuts the connection), so the
            # client never mistakes a failed stream for a complete one.
            nursery.cancel_scope.cancel()

    async def _read_body(
        self, headers: list[tuple[bytes, bytes]], receive: Receive, send: Send,
        close: bool = False,
    ) -> bytes | None:
        """The whole request body, or None after answering 413/408 (or the client left).

        Bounded three ways: ``max_body_bytes`` (413, at once when Content-Length says so),
        ``body_idle_timeout`` between pieces and ``body_timeout`` for all of it (408)."""
        server = self.config.server
        cap = server.max_body_bytes
        framed = False  # a Content-Length over 0 or a Transfer-Encoding: a body may follow
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                digits = value.strip().lstrip(b"0")
                if digits.isdigit() and (len(digits) > 18 or int(digits) > cap):
                    await send_error(send, 413, f"request body over {cap} bytes", close=close)
                    return None
                framed = framed or bool(digits)
            elif lname == b"transfer-encoding":
                framed = True
        body = bytearray()
        first: Message | None = None
        if close and not framed:
            # HTTP/1.x (``close``) without a Content-Length over 0 or a Transfer-Encoding: the
            # body is empty by its framing (RFC 9112 section 6.3), its one message already
            # known to the server: no timeouts to arm (two cancel scopes per stream). A body
            # given all the same goes the general way below.
            first = await receive()
            if first["type"] == "http.request" and not first.get("more_body", False) and \
                    not first.get("body"):
                return b""
        with trio.move_on_after(server.body_timeout) as whole:
            while True:
                msg, first = first, None
                if msg is None:
                    with trio.move_on_after(server.body_idle_timeout):
                        msg = await receive()
                if msg is None:
                    await send_error(send, 408, "request body idle timeout", close=close)
                    return None
                if msg["type"] == "http.disconnect":
                    return None
                body += msg.get("body", b"")
                if len(body) > cap:
                    await send_error(send, 413, f"request body over {cap} bytes", close=close)
                    return None
                if not msg.get("more_body", False):
                    return bytes(body)
        assert whole.cancelled_caught
        await send_error(send, 408, "request body timeout", close=close)
        return None

    async def _relay(
        self, stream: LiveStream, receive: Receive, send: Send, scope: Scope | None = None
    ) -> None:
        sub = stream.subscribe()
        # The lean engine's direct path (``_h1.py``): this task parks in the server, which
        # watches the client, while the stream task writes new chunks to the client's socket
        # itself. Not for rewritten (resumable) streams: every event goes through this task.
        direct: Direct | None = None
        if scope is not None and not stream.route.resumable:
            direct = scope.get("extensions", {}).get(DIRECT_EXTENSION)
        if direct is not None:
            ok = False
            try:
                ok = await self._respond(stream, sub, send, direct)
            finally:
                stream.unsubscribe(sub, client_left=sub.dropped or not ok)
            return
        client_left = False
        ok = False
        watched = _EndWatch(send)
        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    nonlocal client_left
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            if not watched.ending:
                                client_left = True
                                nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(watch_disconnect)
                ok = await self._respond(stream, sub, watched)
                nursery.cancel_scope.cancel()
        finally:
            stream.unsubscribe(sub, client_left=client_left or sub.dropped or not ok)

    async def _respond(
        self, stream: LiveStream, sub: Subscriber, send: Send, direct: Direct | None = None
    ) -> bool:
        """Send the response; True when the client got all of it (False: it left, or was
        dropped). ``direct``: the server's direct path, which also tells when the client
        left (without it a watcher task cancels this one)."""
        if direct is None:
            await stream.response_ready.wait()
        elif await stream.wait_ready(sub, direct):
            return False
        if direct is not None and sub.started:
            # The stream task wrote the head (LiveStream._start_direct), and maybe chunks.
            return await self._finish(stream, sub, send, None, direct)
        sid = stream.record.id
        if stream.upstream_status is None:
            status = stream.record.status
            await send_error(
                send, stream.error_status, f"stream ended before the upstream answered: "
                f"{status} ({stream.record.reason})", stream_id=sid,
                retry_after=1 if stream.error_status == 503 else None,
            )
            return True
        rewriter: EventRewriter | None = None
        if stream.route.resumable and stream.is_sse:
            server = self.config.server
            rewriter = EventRewriter(sid, max_line_bytes=server.max_line_bytes,
                                     max_event_bytes=server.max_event_bytes)
        await send({"type": "http.response.start", "status": stream.upstream_status,
                    "headers": stream.client_head()})
        return await self._finish(stream, sub, send, rewriter, direct)

    async def _finish(
        self, stream: LiveStream, sub: Subscriber, send: Send, rewriter: EventRewriter | None,
        direct: Direct | None,
    ) -> bool:
        """:meth:`_respond` once the head is out: the body, then the end."""
        if not await _pump(stream, sub, send, self.supervisor, rewriter, direct):
            return False
        if rewriter is not None and rewriter.overflowed:
            return True  # cut without a clean end: the rest cannot carry resumable ids
        status = stream.record.status
        if status is Status.COMPLETED:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif status is Status.INTERRUPTED and stream.is_sse:
            # Shutdown cut the stream: tell the SSE client where to resume, and end properly in
            # the same send (one pass through the server for each of a drain's many streams).
            with trio.move_on_after(self.config.server.persist_timeout, shield=True):
                await send({"type": "http.response.body",
                            "body": reconnect_event(stream, rewriter), "more_body": False})
        # Any other ending: return without a final body; Hypercorn cuts the connection, so the
        # client never sees a clean end of body that fakes completion.
        return True


def reconnect_event(stream: LiveStream, rewriter: EventRewriter | None = None) -> bytes:
    """The last SSE event of a stream cut by shutdown: where to resume, and how soon.

    If the upstream's bytes stopped inside an event, a blank line first ends it (the client
    then sees that partial event; the resume point is before it, so it is sent again whole).
    """
    rec = stream.record
    last_id = rewriter.last_id if rewriter is not None else rec.last_event_id
    payload = json.dumps({
        "keepstream_id": rec.id,
        "status": str(rec.status),
        "last_event_id": last_id,
        "offset": stream.boundary,
        "resume": f"/_keepstream/streams/{rec.id}/body?offset={stream.boundary}",
    }, separators=(",", ":")).encode()
    lead = b"\n\n" if stream.end != stream.boundary and rewriter is None else b""
    id_line = b"id: " + last_id.encode() + b"\n" if last_id else b""
    return lead + b"event: keepstream-reconnect\n" + id_line + b"retry: 1000\ndata: " + \
        payload + b"\n\n"


async def _pump(
    stream: LiveStream, sub: Subscriber, send: Send, sup: Supervisor,
    rewriter: EventRewriter | None = None, direct: Direct | None = None,
) -> bool:
    """Copy the stream to ``send`` from ``sub.offset`` until it finishes (or ``rewriter``
    overflowed). False if the subscriber was dropped or (``direct``) the client left.
    ``direct``: the server's direct path (see :meth:`LiveStream.wait_direct`), used while caught
    up; never with a rewriter."""
    assert direct is None or rewriter is None
    writer = sup.writer
    while True:
        if sub.dropped or (direct is not None and direct.client_gone()):
            return False
        try:
            data = stream.read(sub)
        except Lagging:
            data = await writer.read_body(
                stream.record.id, sub.offset, min(stream.base - sub.offset, MAX_SEND)
            )
        if data:
            sub.offset += len(data)
            if rewriter is not None:
                data = rewriter.feed(data)
                if not data:
                    continue
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if rewriter is not None and rewriter.overflowed:
                return True
            continue
        if sub.must_flush:
            # The direct path left bytes the socket did not take: send() writes them first.
            sub.must_flush = False
            await send({"type": "http.response.body", "body": b"", "more_body": True})
            continue
        if stream.finished:
            return True
        if direct is not None:
            if await stream.wait_direct(sub, direct):
                return False
        else:
            await stream.wait_data(sub.offset)


def _prefers_async(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"prefer":
            tokens = [t.strip().split(b"=")[0].strip().lower() for t in value.split(b",")]
            if b"respond-async" in tokens:
                return True
    return False


def _query_int(scope: Scope, key: str) -> int:
    """A non-negative integer query parameter; 0 when absent. Raises RequestRejected(400) for
    anything but 1 to 18 ASCII digits."""
    from urllib.parse import parse_qs

    qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = qs.get(key)
    if not values:
        return 0
    value = values[0]
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise RequestRejected(400, f"{key} must be a non-negative integer")
    return int(value)


class _EndWatch:
    """``send`` that notes when the final body message starts (``ending``).

    Hypercorn handles the end of a response inside that ``send()`` call: it ends the message,
    then recycles or closes the connection, and on the way it hands the app an
    ``http.disconnect``. A disconnect watcher must not cancel the send then, or the connection
    is neither recycled (the keep-alive timer never starts) nor closed (``Connection: close``
    is ignored)."""

    __slots__ = ("_send", "ending")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.ending = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ending = True
        await self._send(message)


async def _trivial_lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
