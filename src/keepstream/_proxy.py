"""``open_proxy``: the supervisor, the journal writer and the upstream client, owned by one
async context manager. Used by ``keepstream serve``, by ``create_app``'s lifespan, and by users
embedding keepstream in their own Trio service.

Exception policy: if the body of ``async with open_proxy(...)`` raises, that exception propagates
unchanged. If one of keepstream's own tasks fails, :class:`~keepstream.ProxyError` is raised from
the ExceptionGroup of the failures (the group is its ``__cause__``). Cancellation propagates as
usual.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from . import _pool
from ._app import KeepstreamApp
from ._config import Config, upstream_credentials
from ._errors import ProxyError
from ._journal import JournalWriter, open_backend
from ._poller import UpstreamPoller
from ._record import new_instance_id
from ._rules import (
    RequestRejected,
    check_request,
    filter_request_headers,
    match_route,
    normalize_path,
)
from ._supervisor import MAX_SEND, Lagging, LiveStream, StreamRefused, Subscriber, Supervisor
from ._transport import FastTransport

log = logging.getLogger("keepstream")


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing. The upstream client is shared by every caller, so a
    ``Set-Cookie`` the upstream sends one caller must never go back upstream with another
    caller's request (httpx's client stores response cookies and sends them on). The header
    itself still reaches the caller it was meant for."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        return None


def make_client(config: Config) -> httpx.AsyncClient:
    """The worker's upstream client: created after start-up, never at import (I7).

    No redirects, no proxy variables from the environment, no default headers of httpx's own
    (a client's request goes upstream with its own headers only), no cookie jar (one caller's
    cookies never reach the upstream with another's request), pool sized for ``max_streams``.
    ``http://`` upstreams go through :class:`~keepstream._transport.FastTransport` (large
    reads, one pass over the chunked framing per read); ``https://`` ones through httpx's own
    transport with the linear pool of ``_pool.py``.
    """
    n = config.server.max_streams
    keepalive = min(n, 256)
    tls = httpx.AsyncHTTPTransport(
        trust_env=False,
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=keepalive,
                            keepalive_expiry=30.0),
    )
    _pool.install(tls)  # linear pool bookkeeping (see _pool.py)
    transport = FastTransport(max_connections=n, max_keepalive=keepalive,
                              keepalive_expiry=30.0, fallback=tls)
    client = httpx.AsyncClient(
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(None, connect=10.0, pool=config.server.pool_timeout),
    )
    for name in list(client.headers.keys()):
        del client.headers[name]
    # No cookie jar: httpx has no public switch for it; its client reads ``_cookies`` through
    # the ``cookies`` property on every request and response.
    client._cookies = _NoCookies()
    _OWN_TRANSPORT[client] = transport
    return client


#: The FastTransport of each client ``make_client`` made (weakly keyed: gone with the client).
_OWN_TRANSPORT: weakref.WeakKeyDictionary[httpx.AsyncClient, FastTransport] = \
    weakref.WeakKeyDictionary()


def own_transport_of(client: httpx.AsyncClient) -> FastTransport | None:
    """The transport under a client of :func:`make_client`'s (None for any other client)."""
    return _OWN_TRANSPORT.get(client)


@dataclass(slots=True)
class StreamHandle:
    """What ``proxy.open_stream`` yields: the response of one journaled stream."""

    id: str
    status_code: int
    headers: list[tuple[bytes, bytes]]
    _stream: LiveStream = field(repr=False)
    _sub: Subscriber = field(repr=False)
    _proxy: Proxy = field(repr=False)

    @property
    def status(self) -> str:
        """The record's status now (``open`` until the stream ends)."""
        return str(self._stream.record.status)

    def __aiter__(self) -> StreamHandle:
        return self

    async def __anext__(self) -> bytes:
        """The next body bytes (everything waiting, coalesced); ends with the stream.

        A plain iterator rather than an async generator: leaving the loop early needs no
        ``aclosing``. Leaving the ``open_stream`` block is what counts as the client leaving.
        """
        stream, sub = self._stream, self._sub
        while True:
            try:
                data = stream.read(sub)
            except Lagging:
                data = await self._proxy.supervisor.writer.read_body(
                    stream.record.id, sub.offset, min(stream.base - sub.offset, MAX_SEND))
            if data:
                sub.offset += len(data)
                return data
            if stream.finished:
                raise StopAsyncIteration
            await stream.wait_data(sub.offset)

    async def wait_finished(self) -> str:
        """Wait until the record is terminal and persisted; return its status."""
        await self._stream.done.wait()
        return str(self._stream.record.status)


class Proxy:
    """A running keepstream instance inside the caller's Trio program (see ``open_proxy``)."""

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.app = KeepstreamApp(supervisor)
        self._prefixes = [r.prefix for r in config.routes]
        self._upstream_auth = upstream_credentials(config)

    @property
    def draining(self) -> bool:
        """True once a drain has begun (a signal, ``aclose`` or leaving ``open_proxy``)."""
        return self.supervisor.draining

    @asynccontextmanager
    async def open_stream(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> AsyncIterator[StreamHandle]:
        """Open a journaled stream exactly as an incoming request to ``path`` would.

        Raises :class:`~keepstream.RequestRejected` (bad path, no route) or
        :class:`~keepstream.StreamRefused` (draining, limits, journal down). If the upstream
        fails before answering, the handle has ``status_code`` 502/503/504 and no body.
        Leaving the block before the body ended counts as the client leaving: the route's
        ``on_disconnect`` policy applies.
        """
        raw_headers = [
            (k.encode("latin-1") if isinstance(k, str) else k,
             v.encode("latin-1") if isinstance(v, str) else v)
            for k, v in (headers or [])
        ]
        try:
            raw_path, _, query = path.encode("ascii").partition(b"?")
        except UnicodeEncodeError:
            raise RequestRejected(400, "path must be ASCII (percent-encode it)") from None
        check_request(method, raw_path, raw_headers)
        safe = normalize_path(raw_path)
        idx = match_route(self._prefixes, safe)
        if idx is None:
            raise RequestRejected(404, f"no route for {path!r}")
        route = self.config.routes[idx]
        url = self.supervisor.upstream_url(route, safe, query)
        upstream_headers = filter_request_headers(raw_headers)
        auth = self._upstream_auth.get(route.prefix)
        if auth is not None:  # the route's own upstream credential replaces any given here
            upstream_headers = [(k, v) for k, v in upstream_headers if k != b"authorization"]
            upstream_headers.append((b"authorization", auth))
        stream = await self.supervisor.start_stream(
            route, method, safe, url, upstream_headers, body,
        )
        sub = stream.subscribe()
        completed = False
        try:
            await stream.response_ready.wait()
            status = stream.upstream_status
            handle = StreamHandle(
                id=stream.record.id,
                status_code=status if status is not None else stream.error_status,
                headers=list(stream.response_headers),
                _stream=stream, _sub=sub, _proxy=self,
            )
            yield handle
            completed = stream.finished and sub.offset >= stream.end
        finally:
            stream.unsubscribe(sub, client_left=not completed)

    async def aclose(self) -> None:
        """Drain now (bounded by ``drain_delay + drain_timeout``) and persist every live
        stream; streams still running after that are cancelled and recorded ``interrupted``."""
        await self.supervisor.drain()


@asynccontextmanager
async def open_proxy(
    config: Config, *, client: httpx.AsyncClient | None = None, recover: bool = True
) -> AsyncIterator[Proxy]:
    """Run keepstream's supervisor and journal writer for the duration of the block.

    On exit, live streams drain (up to ``drain_delay + drain_timeout``), the rest are
    interrupted and every record is persisted before this returns. ``client`` lets tests and
    embedders supply their own ``httpx.AsyncClient`` (for example one with a custom transport);
    it is then not closed here. ``recover=False`` skips start-up recovery (records left
    ``open`` by dead instances become ``orphaned`` only when it runs; with several processes on
    one journal, run it once before they start).
    """
    upstream_credentials(config)  # a missing credential fails here, before anything opens
    backend = open_backend(config.journal.url)
    writer = JournalWriter(backend, config.journal)
    instance = new_instance_id()
    own_client = client is None
    body_exc: BaseException | None = None
    try:
        orphaned = await writer.setup(instance, recover=recover)
        if orphaned:
            log.warning("keepstream: start-up recovery marked %d record(s) orphaned", orphaned)
        upstream = make_client(config) if client is None else client
        # keepstream's own client has no hooks, auth, redirects or cookies: the stream task may
        # hand its requests to the transport itself (Supervisor.transport).
        own_transport = own_transport_of(upstream) if own_client else None
        try:
            # The writer runs shielded: when the caller cancels ``open_proxy`` from outside,
            # the streams still write their terminal records during the (shielded) drain, so
            # the writer must outlive them. It is cancelled explicitly, after the streams
            # nursery has ended, and then makes its final flush.
            writer_scope = trio.CancelScope(shield=True)
            async with trio.open_nursery() as root:
                await root.start(_run_in_scope, writer.run, writer_scope,
                                 name="keepstream journal writer")
                # The poller runs shielded as the writer does, so a cancelled ``open_proxy``
                # still reads the upstreams of the streams its drain lets finish.
                poller = UpstreamPoller.create() if config.server.upstream_poller else None
                poller_scope = trio.CancelScope(shield=True)
                if poller is not None:
                    await root.start(_run_in_scope, poller.run, poller_scope,
                                     name="keepstream upstream poller")
                try:
                    async with trio.open_nursery() as streams:
                        supervisor = Supervisor(config, writer, upstream, streams, instance,
                                                transport=own_transport, poller=poller)
                        supervisor.recovered = orphaned
                        proxy = Proxy(config, supervisor)
                        try:
                            yield proxy
                        except BaseException as exc:
                            body_exc = exc
                            raise
                        finally:
                            with trio.CancelScope(shield=True):
                                await supervisor.drain()
                finally:
                    poller_scope.cancel()
                    writer_scope.cancel()
                root.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if body_exc is not None and _only(group, body_exc):
                raise body_exc from None
            rest = group.split(trio.Cancelled)[1]
            if rest is None:
                raise
            raise ProxyError(f"keepstream task failed: {rest!r}") from group
        finally:
            if own_client:
                with trio.move_on_after(1.0, shield=True):
                    await upstream.aclose()
    finally:
        await trio.to_thread.run_sync(backend.close) if backend.threaded else backend.close()


async def _run_in_scope(
    fn: Callable[..., Awaitable[None]],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` inside ``scope`` (so its owner can shield and cancel it)."""
    with scope:
        await fn(task_status=task_status)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out += _leaves(e)
        return out
    return [exc]


def _only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """True when every non-Cancelled leaf of ``group`` came from ``exc`` (the block's own)."""
    own = {id(e) for e in _leaves(exc)}
    leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    return bool(leaves) and all(id(e) in own for e in leaves)


__all__ = ["Proxy", "StreamHandle", "StreamRefused", "open_proxy"]
