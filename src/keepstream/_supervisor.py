"""The stream supervisor: owns every live stream in one nursery that outlives any request.

A stream is one task (:meth:`LiveStream.run`): upstream fetch -> journal + live buffer ->
subscribers, inside a cancel scope that carries the route's deadlines. Its single ``finally``
persists the terminal status: an inline commit at once when the journal can take it, else
under ``trio.move_on_after(persist_timeout, shield=True)``; nothing else ever writes a terminal
status (I1). Requests are only subscribers: they read the live buffer
from their own offset and never own the upstream connection, so the stream can outlive them
(``on_disconnect = "finish"``, detached streams).

Memory (I8): the live buffer keeps the bytes from the slowest subscriber's offset, capped at
``stream_buffer_bytes``. Bytes past the cap that the journal has already made durable are dropped
from memory; a subscriber that falls behind them reads the journal instead. With a journal that
keeps bodies, bytes every subscriber has sent are dropped once durable too (every
``TRIM_EVERY`` chunks), so an idle stream holds a few chunks, not the cap. Bytes not yet durable
are never dropped (the journal writer flushes once ``flush_bytes`` are pending, so this is
bounded too). With journal ``none`` a subscriber that falls behind the cap is dropped as stalled.
"""

from __future__ import annotations

import errno
import logging
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from ._config import Config, Route
from ._errors import KeepstreamError
from ._journal import JournalWriter
from ._poller import UpstreamPoller
from ._record import Record, new_stream_id
from ._rules import build_upstream_url, filter_response_headers
from ._sse import SSEParser
from ._state import Ending, Status, pick_ending, terminal_status
from ._transport import RAW_BODY, FastTransport, Sent, _Body

Headers = list[tuple[bytes, bytes]]

log = logging.getLogger("keepstream")

#: Most bytes one downstream ``send()`` carries when several chunks are waiting.
MAX_SEND = 16 * 1024

#: With a journal that keeps bodies, every this many chunks the live buffer drops what every
#: subscriber has sent and the journal has made durable, whatever the buffer's size: an open
#: stream holds a few chunks in memory, not ``stream_buffer_bytes`` (a late reader reads the
#: journal, as one that fell behind does).
TRIM_EVERY = 8


#: errno values of a connect that failed on this host's limits, not the upstream's fault.
_LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Most the idle deadline may fire after ``idle_timeout`` (see :func:`idle_slack`).
MAX_IDLE_SLACK = 0.25
#: Upstream URLs kept parsed (:meth:`Supervisor.upstream_url`): a gateway's streams go to a few
#: distinct URLs, so the route checks and httpx's URL parsing run once per URL, not per stream.
URL_CACHE_SIZE = 512
#: Longer client paths plus queries are parsed each time, never kept.
URL_CACHE_MAX_KEY = 512


def idle_slack(idle_timeout: float) -> float:
    """How late an idle timeout may fire: ``min(MAX_IDLE_SLACK, idle_timeout / 8)``. The
    stream re-arms its idle deadline only when it comes closer than ``idle_timeout``, pushing
    it ``idle_timeout + slack`` ahead, so a busy stream updates it once per ``slack``."""
    return min(MAX_IDLE_SLACK, idle_timeout / 8)


class StreamRefused(KeepstreamError):
    """A new stream could not be started; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Lagging(Exception):
    """The subscriber's offset is older than the live buffer: read the journal instead."""


#: What :meth:`Direct.send_nowait` returns.
SINK_REFUSED = 0  # not taken: the subscriber's task sends it as usual
SINK_TAKEN = 1  # written out whole
SINK_BLOCKED = 2  # taken, but the rest waits for the socket: the subscriber's task must flush

# What the upstream poller left the stream task to do (LiveStream._relay_polled).
_POLL_WAIT = 0  # nothing: wait on
_POLL_DONE = 1  # the body ended, or failed (``_poll_error``)
_POLL_ROOM = 2  # the journal is over its backlog: wait for room
_POLL_GONE = 3  # the poller stopped: read through trio


class Direct(Protocol):
    """The direct path a server offers one response (the ``keepstream.direct`` scope
    extension; the lean engine's connection is one). With it the relay is one task: it parks
    in :meth:`wait_client`, which watches the client's socket, and the stream task writes new
    chunks with :meth:`send_nowait` and ends the wait with :meth:`wake` when the relay must
    act. No separate disconnect watcher, so one task less per stream."""

    def send_nowait(self, body: bytes) -> int:
        """Write ``body`` as the response's next piece now, never waiting: a ``SINK_*``."""
        ...

    def start_nowait(self, status: int, headers: list[tuple[bytes, bytes]]) -> int:
        """Write the response head now, never waiting, as the relay's
        ``http.response.start`` would: a ``SINK_*`` (refused: the relay sends it itself)."""
        ...

    def wake(self) -> None:
        """End a :meth:`wait_client` in progress (called by the stream task)."""
        ...

    async def wait_client(self, poller: UpstreamPoller | None = None) -> bool:
        """Until :meth:`wake` or the client leaves; True when it left. ``poller``: the
        upstream poller, which may watch the client's socket for the wait."""
        ...

    def client_gone(self) -> bool:
        """True once the client has gone (a write failed, or it closed)."""
        ...


@dataclass(slots=True, eq=False)
class Subscriber:
    offset: int = 0
    dropped: bool = False
    #: Set while the subscriber's task is parked in :meth:`LiveStream.wait_direct`.
    direct: Direct | None = None
    #: While parked: new chunks go to ``direct.send_nowait`` (False: only a wake-up).
    takes: bool = False
    #: The direct path took bytes it could not write out at once (SINK_BLOCKED).
    must_flush: bool = False
    #: Parked in :meth:`LiveStream.wait_ready`: the stream task writes the response head
    #: through the direct path itself when the upstream's head is in (``start_nowait``).
    starts: bool = False
    #: The response head went out that way: the subscriber's task must not send it again.
    started: bool = False


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The first ``Content-Type`` value (b"" if none): what ``startswith`` sees of httpx's
    ``headers.get("content-type")``, which joins repeated values after the first."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value
    return b""


class _ReadBody:
    """The body of a Response that was read before keepstream got it: one chunk."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _ReadBody:
        return self

    async def __anext__(self) -> bytes:
        data = self._data
        if data is None:
            raise StopAsyncIteration
        self._data = None
        return data


class LiveStream:
    """One stream's state while it runs. Only its own task (``run``) mutates the buffer."""

    # Slots: an open stream is mostly waiting, and every byte of it counts (idle RSS per open
    # stream is an issue-8 figure); a dict of this many attributes costs about 1 KiB more.
    __slots__ = (
        "_armed", "_causes", "_chunks", "_done_event", "_finish_deadline", "_fixed_deadline",
        "_head", "_idle", "_parked", "_poll_body", "_poll_error", "_poll_state",
        "_poll_task", "_ready_event", "_reason", "_sent", "_slack", "_starts", "_subs",
        "_waiter",
        "base", "end", "ended", "error_status", "finished", "is_sse", "parser", "ready",
        "record", "request_body", "request_headers", "response_headers", "route", "scope",
        "supervisor", "upstream_status", "url",
    )

    def __init__(
        self,
        supervisor: Supervisor,
        record: Record,
        route: Route,
        url: str | httpx.URL,
        headers: Headers,
        body: bytes,
    ) -> None:
        self.supervisor = supervisor
        self.record = record
        self.route = route
        self.url = url
        self.request_headers = headers
        self.request_body = body
        self.scope = trio.CancelScope()
        self._sent: Sent | None = None  # the request, written by send_early
        # ``response_ready`` and ``done``: created when first awaited (most streams' relay
        # never awaits them on the lean engine), so an open stream carries no idle Events.
        self.ready = False  # upstream status and headers known, or the stream ended
        self.ended = False  # ``finished`` and every bookkeeping step after it done
        self._ready_event: trio.Event | None = None
        self._done_event: trio.Event | None = None
        self.finished = False  # terminal status persisted (or persist deadline passed)
        self.upstream_status: int | None = None
        self.response_headers: Headers = []
        self.is_sse = False
        self.error_status = 502
        self._causes: list[Ending] = []
        self._reason: str | None = None
        # live buffer: _chunks[i] starts at stream offset _starts[i]; valid from index _head
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0
        self.base = 0  # offset of the first byte still in memory
        self.end = 0  # bytes received from the upstream so far
        self._waiter: trio.Event | None = None
        self._subs: list[Subscriber] = []
        self._parked = 0  # subscribers parked in wait_direct
        self._fixed_deadline = float("inf")
        self._finish_deadline = False  # the finish_timeout deadline is in force
        self.parser: SSEParser | None = None
        # the idle deadline (see run) and the upstream poller's state (see _relay_polled)
        self._idle = 0.0
        self._slack = 0.0
        self._armed = 0.0
        self._poll_body: _Body | None = None
        self._poll_task: trio.lowlevel.Task | None = None  # parked in _relay_polled
        self._poll_state = _POLL_WAIT
        self._poll_error: Exception | None = None

    @property
    def response_ready(self) -> trio.Event:
        """Set once the upstream's status and headers are known (or the stream ended)."""
        if self._ready_event is None:
            self._ready_event = trio.Event()
            if self.ready:
                self._ready_event.set()
        return self._ready_event

    @property
    def done(self) -> trio.Event:
        """Set once the stream ended and its terminal record is persisted."""
        if self._done_event is None:
            self._done_event = trio.Event()
            if self.ended:
                self._done_event.set()
        return self._done_event

    def _set_ready(self) -> None:
        self.ready = True
        if self._ready_event is not None:
            self._ready_event.set()
        self._wake()  # a relay parked in wait_ready

    @property
    def boundary(self) -> int:
        """Stream offset just after the last complete SSE event or comment (0 if none)."""
        return 0 if self.parser is None else self.parser.boundary

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(self, offset: int = 0) -> Subscriber:
        sub = Subscriber(offset)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber, *, client_left: bool) -> None:
        """A request stopped reading. ``client_left``: it stopped before the end of the stream."""
        if sub in self._subs:
            self._subs.remove(sub)
        self._unpark(sub)
        if client_left and not self.finished and not self._subs and not self.record.detached:
            self._client_gone()

    def _client_gone(self) -> None:
        rec = self.record
        if rec.status is not Status.OPEN:
            return  # already terminal (its persist is in flight): the record is final
        if rec.client_gone_at is None:
            rec.client_gone_at = time.time()
            self.supervisor.writer.touch(rec)
        if self.route.on_disconnect == "cancel":
            self.stop(Ending.CLIENT_GONE_CANCEL, "client disconnected")
        else:
            self._fixed_deadline = min(
                self._fixed_deadline, trio.current_time() + self.route.finish_timeout
            )
            self._finish_deadline = True
            self.scope.deadline = min(self.scope.deadline, self._fixed_deadline)

    def stop(self, ending: Ending, reason: str) -> None:
        """End the stream on purpose (cancel, client gone, shutdown). Idempotent."""
        if not self.finished:
            self._causes.append(ending)
            if self._reason is None:
                self._reason = reason
            self.scope.cancel()

    def read(self, sub: Subscriber) -> bytes:
        """The buffered bytes from ``sub.offset`` on, joined (b"" if none yet).

        Everything waiting goes out in one ``send()`` (coalescing), up to ``MAX_SEND`` bytes
        (or one whole chunk, if larger), so a slow subscriber never costs a large copy.
        """
        offset = sub.offset
        if offset >= self.end:
            return b""
        if self.end - self.base > self.supervisor.buffer_cap:
            # The journal may have caught up since the last push: drop what it now holds.
            self._trim()
        if offset < self.base:
            raise Lagging
        chunks = self._chunks
        i = bisect_right(self._starts, offset, lo=self._head) - 1
        first = chunks[i]
        skip = offset - self._starts[i]
        if skip:
            first = first[skip:]
        last = len(chunks) - 1
        if i == last or len(first) >= MAX_SEND:
            return first
        if self.end - offset <= MAX_SEND:
            return first + b"".join(chunks[i + 1 :])
        parts = [first]
        size = len(first)
        j = i + 1
        while j <= last and size + len(chunks[j]) <= MAX_SEND:
            parts.append(chunks[j])
            size += len(chunks[j])
            j += 1
        return b"".join(parts)

    async def wait_data(self, offset: int) -> None:
        """Return once bytes past ``offset`` arrived or the stream finished."""
        while offset >= self.end and not self.finished:
            if self._waiter is None:
                self._waiter = trio.Event()
            await self._waiter.wait()

    def _wake(self) -> None:
        """Something changed for every subscriber (new bytes, headers, the end)."""
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None
        if self._parked:
            for sub in self._subs:
                direct = sub.direct
                if direct is not None:
                    if sub.starts:
                        sub.starts = False
                        if self._start_direct(sub, direct):
                            continue  # the head is out; the relay sleeps on, taking chunks
                    self._unpark(sub)
                    direct.wake()

    def client_head(self) -> list[tuple[bytes, bytes]]:
        """The response headers the client gets: the upstream's, filtered, and the id."""
        return [*self.response_headers, (b"keepstream-id", self.record.id.encode())]

    def _start_direct(self, sub: Subscriber, direct: Direct) -> bool:
        """The upstream's head is in and ``sub``'s relay sleeps in :meth:`wait_ready`: write
        the client's response head through ``direct`` now, from this task, so the first
        chunks (often read with the head) go out through ``send_nowait`` before this task
        goes on (its terminal commit, for a short body) and without waking the relay for
        the head; it wakes for the end, or when the path refuses. True when ``sub`` stays
        parked, taking chunks."""
        status = self.upstream_status
        if status is None or self.finished:
            return False  # an error answer, or the end: the relay's own
        taken = direct.start_nowait(status, self.client_head())
        if taken == SINK_REFUSED:
            return False
        sub.started = True
        if taken == SINK_BLOCKED:
            sub.must_flush = True  # the relay's next send writes the rest of the head first
            return False
        sub.takes = True
        return True

    def _unpark(self, sub: Subscriber) -> None:
        if sub.direct is not None:
            sub.direct = None
            self._parked -= 1

    async def wait_direct(self, sub: Subscriber, direct: Direct) -> bool:
        """:meth:`wait_data` for a subscriber that has sent everything so far, through a
        server's direct path (:class:`Direct`), which also watches the client: until the stream
        finishes (or ``direct`` cannot take a chunk), the stream task writes each new chunk
        itself and advances ``sub.offset``, so a paced event wakes one task, not two. Returns
        True when the client left; False when the stream finished, the direct path refused or
        blocked (``sub.must_flush``), or data is waiting for ``sub``."""
        if sub.offset < self.end or self.finished:
            return False
        return await self._park(sub, direct, takes=True)

    async def wait_ready(self, sub: Subscriber, direct: Direct) -> bool:
        """``response_ready.wait()`` while watching the client through ``direct``: True when
        the client left first. Meanwhile the stream task may write the response head itself
        (:meth:`_start_direct`: then ``sub.started``) and the chunks after it, and wake this
        task only when it has to act (the end, a refusal, a blocked socket)."""
        while not self.ready:
            sub.starts = not sub.started
            try:
                if await self._park(sub, direct, takes=False):
                    return True
            finally:
                sub.starts = False
        return False

    async def _park(self, sub: Subscriber, direct: Direct, *, takes: bool) -> bool:
        sub.direct = direct
        sub.takes = takes
        self._parked += 1
        try:
            return await direct.wait_client(self.supervisor.poller)
        finally:
            self._unpark(sub)

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._starts.append(self.end)
        self.end += len(data)
        if self._parked:
            self._hand_off(data)
        elif self._waiter is not None:
            self._waiter.set()
            self._waiter = None
        if self.end - self.base > self.supervisor.buffer_cap or \
                (self.supervisor.trims_early and not len(self._chunks) % TRIM_EVERY):
            self._trim()

    def _hand_off(self, data: bytes) -> None:
        """Give ``data`` to every parked subscriber's direct path; wake a subscriber's task
        only if it has to act (not parked, a refusal, a blocked socket)."""
        wake = False
        end = self.end
        for sub in self._subs:
            direct = sub.direct
            if direct is None:
                wake = True
                continue
            taken = direct.send_nowait(data) if sub.takes else SINK_REFUSED
            if taken:
                sub.offset = end
            if taken != SINK_TAKEN:
                sub.must_flush = taken == SINK_BLOCKED
                self._unpark(sub)
                direct.wake()
        if wake and self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def _trim(self) -> None:
        sup = self.supervisor
        low = min((s.offset for s in self._subs), default=self.end)
        want = max(low, self.end - sup.buffer_cap)
        if sup.writer.backend.stores_bodies:
            want = min(want, self.record.durable)
        else:
            for s in self._subs:
                if s.offset < want:
                    s.dropped = True
        i = self._head
        n = len(self._chunks)
        while i < n - 1 and self._starts[i + 1] <= want:
            i += 1
        if i == self._head:
            return
        for j in range(self._head, i):
            self._chunks[j] = b""
        self._head = i
        self.base = self._starts[i]
        if self._head > TRIM_EVERY and self._head * 2 > n:
            del self._chunks[: self._head]
            del self._starts[: self._head]
            self._head = 0

    # -- upstream bytes -------------------------------------------------------------------

    def _take_chunk(self, chunk: bytes) -> bool:
        """Relay, journal and count one piece of the upstream body (non-empty). True when
        the journal is over its backlog: the caller waits for room (``writer.wait_room``),
        then re-arms the idle deadline (``_rearm``)."""
        rec = self.record
        writer = self.supervisor.writer
        self._push(chunk)
        writer.append(rec, chunk)
        rec.bytes += len(chunk)
        parser = self.parser
        if parser is not None and parser.count(chunk):
            rec.events = parser.events
            rec.last_event_id = parser.dispatched_id
        if writer.over_backlog():
            # A slow journal is not an idle upstream: only the fixed deadlines run while the
            # stream waits for room.
            self.scope.deadline = self._fixed_deadline
            self._armed = 0.0
            return True
        now = self.supervisor.clock.current_time()
        if now + self._idle > self._armed:
            self._armed = now + self._idle + self._slack
            self.scope.deadline = min(self._fixed_deadline, self._armed)
        return False

    def _rearm(self) -> None:
        now = self.supervisor.clock.current_time()
        if now + self._idle > self._armed:
            self._armed = now + self._idle + self._slack
            self.scope.deadline = min(self._fixed_deadline, self._armed)

    async def _relay_polled(self, body: _Body, poller: UpstreamPoller) -> bool:
        """Read ``body`` to its end through ``poller`` (``keepstream._poller``): the poller
        task calls :meth:`on_readable` for each read, and this task only waits, unless the
        body ended or failed, the journal asks for room, or the scope was cancelled. False if
        the poller stopped first: the caller reads the rest through trio."""
        fd = body.fd
        self._poll_body = body
        try:
            if body._first:
                await trio.lowlevel.checkpoint_if_cancelled()  # (on_readable does not check)
                self.on_readable()  # the body bytes read with the head
            while True:
                if self._poll_state == _POLL_WAIT:
                    if not poller.add(fd, self):
                        return False
                    # Parked without an Event (no object per wait): _end_poll reschedules
                    # this task; a cancellation (the scope's deadline, stop()) aborts the park.
                    self._poll_task = trio.lowlevel.current_task()
                    try:
                        await trio.lowlevel.wait_task_rescheduled(self._abort_poll)
                    finally:
                        poller.discard(fd)
                        self._poll_task = None
                state, self._poll_state = self._poll_state, _POLL_WAIT
                if state == _POLL_DONE:
                    exc, self._poll_error = self._poll_error, None
                    if exc is not None:
                        raise exc
                    return True
                if state == _POLL_ROOM:
                    await self.supervisor.writer.wait_room()
                    self._rearm()
                    if body.complete:  # the read that filled the journal ended the body
                        return True
                elif state == _POLL_GONE:
                    return False
        finally:
            self._poll_body = None
            self._poll_error = None

    def _abort_poll(self, _: Any) -> trio.lowlevel.Abort:
        # Cancelled (the scope's deadline, stop(), shutdown): nothing more is read. The socket
        # is watched only while this task is parked, so letting it go here is what keeps
        # on_readable from reading for a stream that is ending, without a check per read.
        self._poll_task = None
        body = self._poll_body
        if body is not None:
            self.supervisor.poller.discard(body.fd)  # type: ignore[union-attr]
        return trio.lowlevel.Abort.SUCCEEDED

    def _end_poll(self, state: int) -> None:
        self._poll_state = state
        body = self._poll_body
        if body is not None:
            self.supervisor.poller.discard(body.fd)  # type: ignore[union-attr]
        task, self._poll_task = self._poll_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def on_readable(self) -> None:
        """The poller's call (``keepstream._poller.PollTarget``): one read of the body,
        relayed and journalled, in the poller task; never raises ``Exception``. Only called
        while the stream task is parked (a cancellation lets the socket go: ``_abort_poll``)."""
        body = self._poll_body
        assert body is not None
        try:
            try:
                chunk = body.read_nowait()
            except httpx.RemoteProtocolError:
                if body.partial:
                    self._take_chunk(body.partial)  # the bytes before the fault come first
                raise
            if chunk and self._take_chunk(chunk):
                self._end_poll(_POLL_ROOM)
                return
        except Exception as exc:
            self._poll_error = exc
            self._end_poll(_POLL_DONE)
            return
        if body.complete:
            self._end_poll(_POLL_DONE)

    def on_poller_gone(self) -> None:
        self._end_poll(_POLL_GONE)

    # -- the stream task ------------------------------------------------------------------

    def _opens_directly(self) -> bool:
        """The request goes through ``FastTransport.open`` (see :meth:`run`)."""
        sup = self.supervisor
        transport = sup.transport
        client = sup.client
        return transport is not None and isinstance(self.url, httpx.URL) and \
            transport.can_open(self.url) and not client.headers and not client.params and \
            not client.cookies

    def send_early(self) -> None:
        """Write the upstream request now, on an idle pooled connection, without waiting
        (``FastTransport.send_now``); :meth:`run` then reads its answer. Called once the
        record is durable, right before this stream's task is started: the upstream gets the
        request a scheduler pass sooner (before the relay's park and the task's start), which
        is that much less time to the first byte."""
        transport = self.supervisor.transport
        url = self.url
        if transport is not None and isinstance(url, httpx.URL) and self._opens_directly():
            sent = transport.send_now(
                self.record.method, url, self.request_headers, self.request_body)
            if sent is not None:
                self._sent = sent
                self.request_headers, self.request_body = [], b""

    async def run(self) -> None:
        sup = self.supervisor
        rec = self.record
        route = self.route
        writer = sup.writer
        start = trio.current_time()
        self._fixed_deadline = start + route.total_timeout
        if rec.detached:
            self._fixed_deadline = min(self._fixed_deadline, start + route.finish_timeout)
        phase = "first_byte"
        try:
            try:
                with self.scope:
                    self.scope.deadline = min(
                        self._fixed_deadline, start + route.first_byte_timeout
                    )
                    client = sup.client
                    transport = sup.transport
                    url = self.url
                    resp: httpx.Response | None = None
                    raw: Any  # the body: ours (_Body), or what an embedder's Response gives
                    sent, self._sent = self._sent, None
                    if transport is not None and isinstance(url, httpx.URL) and \
                            (sent is not None or self._opens_directly()):
                        # make_client's client adds nothing to a request (no default
                        # headers, params or cookies): our transport writes the same bytes
                        # build_request's Request would give, without that Request and the
                        # Response (about 25 µs less per stream; see FastTransport.open).
                        # (Written already, by send_early, when a pooled connection was idle.)
                        code, raw_headers, raw = await transport.open(
                            rec.method, url, self.request_headers, self.request_body,
                            sup.timeout_dicts[route.prefix], sent,
                        )
                        self.request_headers, self.request_body = [], b""
                        close = raw.aclose
                        consumed = False
                    else:
                        # ``client.stream()`` without its context-manager generator (one
                        # object and frame less per open stream): the same build, send and
                        # close.
                        request = client.build_request(
                            rec.method, url, headers=self.request_headers,
                            content=self.request_body, timeout=sup.timeouts[route.prefix],
                        )
                        self.request_headers, self.request_body = [], b""  # request has them
                        if transport is not None:
                            # The Response does not keep the Request (nor its headers and
                            # URL) for the stream's life: keepstream reads nothing of it later.
                            resp = await transport.handle_async_request(request)
                        else:
                            resp = await client.send(request, stream=True)
                        del request
                        close = resp.aclose
                        code = resp.status_code
                        raw_headers = resp.headers.raw
                        consumed = resp.is_stream_consumed
                    try:
                        rec.upstream_status = self.upstream_status = code
                        rec.first_byte_at = time.time()
                        self.response_headers = filter_response_headers(raw_headers)
                        if consumed:
                            # Read before keepstream got it (``httpx.Response(200,
                            # content=...)``, as httpx.MockTransport handlers make, is read
                            # at construction): its content is decoded, so it is relayed
                            # without the Content-Encoding it no longer has.
                            self.response_headers = [
                                (k, v) for k, v in self.response_headers
                                if k != b"content-encoding"
                            ]
                        if _content_type(raw_headers).startswith(b"text/event-stream"):
                            self.is_sse = True
                            self.parser = SSEParser(
                                max_line_bytes=sup.config.server.max_line_bytes,
                                max_event_bytes=sup.config.server.max_event_bytes,
                            )
                        del raw_headers
                        writer.touch(rec)
                        self._set_ready()
                        phase = "idle"
                        # The idle deadline is re-armed only once it is less than ``idle``
                        # away, and then ``slack`` further: it fires between idle and
                        # idle + slack after the last chunk, never early, and costs one
                        # deadline update per ``slack`` of traffic instead of one per chunk.
                        self._idle = route.idle_timeout
                        self._slack = idle_slack(self._idle)
                        self._armed = 0.0
                        self._rearm()
                        if resp is not None:
                            raw = resp.extensions.get(RAW_BODY)
                            if raw is None or consumed:
                                # A transport of the embedder's; one whose Response was read
                                # already gives its content (aiter_raw() would refuse).
                                raw = _ReadBody(resp.content) if consumed else \
                                    resp.aiter_raw()
                            elif transport is not None:
                                # From our own transport the Response is this frame's alone
                                # and its aclose() only closes the body: the Response (its
                                # headers, its extensions) need not live as long as the stream.
                                close = raw.aclose
                                resp = None
                        poller = sup.poller
                        if poller is None or not isinstance(raw, _Body) or not raw.pollable \
                                or not await self._relay_polled(raw, poller):
                            async for chunk in raw:
                                if chunk and self._take_chunk(chunk):
                                    await writer.wait_room()
                                    self._rearm()
                    finally:
                        await close()
                    self._causes.append(Ending.UPSTREAM_DONE)
            except httpx.PoolTimeout:
                self._fail(Ending.UPSTREAM_FAILED, "upstream connection pool exhausted", 503)
            except httpx.ConnectTimeout:
                self._fail(Ending.DEADLINE, "connect_timeout", 504)
            except httpx.TimeoutException as exc:
                self._fail(Ending.DEADLINE, f"timeout: {exc!r}", 504)
            except httpx.ConnectError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno in _LOCAL_EXHAUSTION:
                    # Our own resources ran out (fd exhaustion), not the upstream: 503 and
                    # Retry-After, so the client tries again once descriptors free up.
                    self._fail(Ending.UPSTREAM_FAILED,
                               f"no local resources for the upstream connection: {cause}", 503)
                else:
                    self._fail(Ending.UPSTREAM_FAILED, f"connect failed: {exc}", 502)
            except (httpx.HTTPError, OSError) as exc:
                self._fail(Ending.UPSTREAM_FAILED, f"{type(exc).__name__}: {exc}", 502)
            except Exception as exc:
                # A bug (ours or a library's) ends this stream, never the process: the record
                # still gets its terminal status and the traceback goes to the log.
                log.exception("keepstream: stream %s failed unexpectedly", rec.id)
                self._fail(Ending.UPSTREAM_FAILED, f"internal error: {type(exc).__name__}", 502)
            if self.scope.cancelled_caught and not self._causes:
                now = trio.current_time()
                if now >= start + route.total_timeout:
                    why = "total_timeout"
                elif (self._finish_deadline or rec.detached) and now >= self._fixed_deadline:
                    why = "finish_timeout"
                else:
                    why = f"{phase}_timeout"
                self._fail(Ending.DEADLINE, why, 504)
        finally:
            sent, self._sent = self._sent, None
            if sent is not None and sup.transport is not None:
                sup.transport.discard(sent)  # written by send_early, never read
            if not self._causes:
                # Cancelled from outside (the supervisor's nursery): shutdown.
                self._causes.append(Ending.SHUTDOWN)
                self._reason = self._reason or "shutdown"
            ending = pick_ending(self._causes)
            status = terminal_status(ending)
            reason = None if status is Status.COMPLETED else (self._reason or ending.value)
            rec.finish(status, reason)
            if status in (Status.INTERRUPTED, Status.CANCELLED) and self.error_status == 502:
                self.error_status = 503
            if not await writer.commit_soon(rec):  # else durable already: no scope to arm
                with trio.move_on_after(sup.config.server.persist_timeout, shield=True):
                    await writer.commit(rec)
            self.finished = True
            self._set_ready()  # wakes every waiting subscriber
            self.ended = True
            if self._done_event is not None:
                self._done_event.set()
            sup._stream_ended(self)

    def _fail(self, ending: Ending, reason: str, http_status: int) -> None:
        self._causes.append(ending)
        if self._reason is None:
            self._reason = reason
        self.error_status = http_status


class Supervisor:
    """Owns the live streams (see module docstring). Created by ``open_proxy``."""

    def __init__(
        self,
        config: Config,
        writer: JournalWriter,
        client: httpx.AsyncClient,
        nursery: trio.Nursery,
        instance: str,
        *,
        transport: FastTransport | None = None,
        poller: UpstreamPoller | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.client = client
        #: ``client``'s transport, when ``client`` is keepstream's own (``make_client``: no
        #: hooks, auth, redirects or cookies): requests go to it directly, without the
        #: client's send layers; while the client adds nothing to a request (no default
        #: headers, params or cookies) through ``FastTransport.open``, without httpx's
        #: ``Request`` and ``Response`` either (the same bytes upstream).
        self.transport = transport
        #: The run's clock (``trio.current_time()`` is three Python calls on top of its
        #: ``current_time()``): the per-chunk deadline re-arm reads it directly.
        self.clock = trio.lowlevel.current_clock()
        #: Reads the upstream sockets of waiting streams (``keepstream._poller``); None: each
        #: stream task waits for its own through trio.
        self.poller = poller
        self.nursery = nursery
        self.instance = instance
        self.buffer_cap = config.server.stream_buffer_bytes
        self.trims_early = writer.backend.stores_bodies
        self.live: dict[str, LiveStream] = {}
        self._per_route: dict[str, int] = {}
        self._per_client: dict[str, int] = {}
        self.draining = False
        self.drain_started: float | None = None
        #: Set once a drain interrupts the streams still live (its deadline, or a second
        #: signal): from then on the server closes each connection when its response ends.
        self.cutting = trio.Event()
        self._accept_until = 0.0
        self.started_total = 0
        self.recovered = 0  # records orphaned by start-up recovery
        self.ended_total: dict[str, int] = {}
        self._idle = trio.Event()
        self._idle.set()
        # Per-route upstream timeouts (connect from the route; first byte, idle and total are
        # the stream's own deadlines; pool from the server).
        self.timeouts = {
            r.prefix: httpx.Timeout(None, connect=r.connect_timeout,
                                    pool=config.server.pool_timeout)
            for r in config.routes
        }
        #: The same as ``FastTransport.open`` takes them (``httpx.Timeout.as_dict()``).
        self.timeout_dicts = {prefix: t.as_dict() for prefix, t in self.timeouts.items()}
        self._urls: dict[tuple[str, str, str, bytes], httpx.URL] = {}

    def upstream_url(self, route: Route, path: str, query: bytes) -> str | httpx.URL:
        """``build_upstream_url`` (raises ``RequestRejected`` the same way), parsed as
        ``httpx.URL``; the last ``URL_CACHE_SIZE`` distinct short ones are kept (httpx's URLs
        are immutable: streams share them). A URL httpx refuses stays a string: the stream
        then fails on it as it would have without this."""
        key = (route.upstream, route.prefix, path, query)
        url = self._urls.get(key)
        if url is not None:
            return url
        text = build_upstream_url(route.upstream, route.prefix, path, query)
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL:
            return text
        if len(path) + len(query) <= URL_CACHE_MAX_KEY:
            if len(self._urls) >= URL_CACHE_SIZE:
                del self._urls[next(iter(self._urls))]  # the oldest
            self._urls[key] = url
        return url

    def accepting(self) -> bool:
        return not self.draining or trio.current_time() < self._accept_until

    async def start_stream(
        self,
        route: Route,
        method: str,
        path: str,
        url: str | httpx.URL,
        headers: Headers,
        body: bytes,
        *,
        detached: bool = False,
        owner: str | None = None,
        send_early: bool = True,
    ) -> LiveStream:
        """Create the record (durably) and start the stream task; raise StreamRefused.
        ``send_early``: write the upstream request at once when a pooled connection is idle
        (:meth:`LiveStream.send_early`), before the stream task's first step."""
        if not self.accepting():
            raise StreamRefused(503, "keepstream is shutting down", retry_after=1)
        if len(self.live) >= self.config.server.max_streams:
            raise StreamRefused(503, "too many concurrent streams", retry_after=1)
        if route.max_streams and self._per_route.get(route.prefix, 0) >= route.max_streams:
            raise StreamRefused(429, "too many concurrent streams on this route", retry_after=1)
        per_client = self.config.server.max_streams_per_client
        if per_client and owner is not None and self._per_client.get(owner, 0) >= per_client:
            raise StreamRefused(429, "too many concurrent streams for this client",
                                retry_after=1)
        rec = Record(
            id=new_stream_id(), instance=self.instance, route=route.prefix, method=method,
            path=path, detached=detached, owner=owner,
        )
        stream = LiveStream(self, rec, route, url, headers, body)
        self.live[rec.id] = stream
        self._count(rec, +1)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.started_total += 1
        if await self.writer.commit_soon(rec):
            refused = False  # durable already (an inline commit): no timeout to arm
        else:
            with trio.move_on_after(self.config.server.persist_timeout) as cs:
                await self.writer.commit(rec)
            refused = cs.cancelled_caught
        if refused:
            del self.live[rec.id]
            self._count(rec, -1)
            self.started_total -= 1
            if not self.live:
                self._idle.set()
            # The row may still reach the journal later (it is queued): make it terminal so
            # it never stays ``open``. No upstream request was made.
            rec.finish(Status.INTERRUPTED, "refused: the journal did not confirm the record "
                       "within persist_timeout; no upstream request was made")
            self.writer.touch(rec)
            raise StreamRefused(503, "the journal cannot record new streams", retry_after=1)
        if send_early:
            stream.send_early()
        try:
            self.nursery.start_soon(stream.run, name=f"keepstream stream {rec.id}")
        except BaseException:
            if stream._sent is not None and self.transport is not None:
                self.transport.discard(stream._sent)
            raise
        return stream

    def _count(self, rec: Record, delta: int) -> None:
        self._per_route[rec.route] = self._per_route.get(rec.route, 0) + delta
        if rec.owner is not None:
            n = self._per_client.get(rec.owner, 0) + delta
            if n:
                self._per_client[rec.owner] = n
            else:
                self._per_client.pop(rec.owner, None)

    def _stream_ended(self, stream: LiveStream) -> None:
        if self.live.pop(stream.record.id, None) is not None:
            self._count(stream.record, -1)
        key = str(stream.record.status)
        self.ended_total[key] = self.ended_total.get(key, 0) + 1
        if not self.live:
            self._idle.set()

    def begin_drain(self) -> None:
        """Readiness false now; stop accepting (after ``drain_delay``). Idempotent."""
        if not self.draining:
            self.draining = True
            self.drain_started = trio.current_time()
            self._accept_until = self.drain_started + self.config.server.drain_delay

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def interrupt_all(self, reason: str = "shutdown after drain deadline") -> None:
        """Interrupt every live stream; while draining, also close any ``drain_delay`` window
        (a second signal accepts nothing new)."""
        if self.draining:
            self._accept_until = 0.0
            self.cutting.set()
            self.writer.grouped = True  # every stream commits now: group their transactions
        for stream in list(self.live.values()):
            stream.stop(Ending.SHUTDOWN, reason)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let streams run on up to ``timeout`` (default ``drain_timeout``),
        interrupt the rest and wait until every one is persisted."""
        self.begin_drain()
        server = self.config.server
        if timeout is None:
            timeout = server.drain_delay + server.drain_timeout
        with trio.move_on_after(timeout):
            await self.wait_idle()
        self.interrupt_all()
        with trio.move_on_after(server.persist_timeout + 0.5, shield=True):
            await self.wait_idle()
