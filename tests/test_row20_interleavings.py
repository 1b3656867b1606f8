"""FAULTS row 20: cancel racing the final persist, over >= 10,000 random interleavings.

Everything runs in virtual time (``autojump_clock``) against the ``memory:`` journal, whose backend
is synchronous and thread-free, so a virtual instant is exact: nothing in the proxy takes time
except what the scripted upstream and the deadlines say.

The upstream is a :class:`ScriptedTransport` handed to ``open_proxy`` as the httpx client's
transport. The path of a request seeds its script (:func:`script_for`): headers after a delay or
a failure before them, a status, scripted chunks with a pause before each, then a clean end, a
``ReadError`` mid-body or a stall. Each trial is one stream on one of several routes (``finish`` or
``cancel`` on disconnect, small first-byte / idle / total / finish deadlines) with one action at a
random virtual time: none, the client leaving ``open_stream``, or an explicit
``LiveStream.stop(Ending.CANCEL_REQUESTED)``. A *race* trial instead acts at the very instant the
upstream ends (cancel, interrupt, or the client leaving), after 0-8 scheduler checkpoints, so the
action lands before, inside or after the shielded final persist. Batches of 1,000 concurrent
trials share one ``open_proxy``. Each shutdown mode (the test's parameter) runs 3 batches, 12,000
trials in all: no shutdown, or part-way through the batch leaving the block, an explicit
``supervisor.drain`` with a small timeout, or cancelling the whole block from outside.

After each batch every record is checked (J, "bad record" when it fails): terminal, its body a
byte-exact prefix of the scripted bytes (all of them iff ``completed``), ``row["bytes"] ==
len(body)``, exactly one row per trial, and a terminal row that was complete when first committed
and never changed afterwards (no half-written terminal row). A model of the script and the
actions gives the exact expected status, reason, body length, upstream status and end instant for
every trial whose outcome is deterministic (all but the race trials, which must end with either
the upstream's own status or the action's); the stream's ``done`` must be set at that same
virtual instant, i.e. the shielded persist finished well within ``persist_timeout``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing

from keepstream import (
    Config,
    JournalConfig,
    Proxy,
    Route,
    ServerConfig,
    StreamHandle,
    open_proxy,
)
from keepstream._journal import Batch, MemoryBackend
from keepstream._state import Ending
from keepstream._supervisor import LiveStream, Supervisor, idle_slack

BATCHES = int(os.environ.get("KEEPSTREAM_ROW20_BATCHES", "3"))  # per shutdown mode
BATCH_SIZE = int(os.environ.get("KEEPSTREAM_ROW20_BATCH_SIZE", "1000"))
PERSIST_TIMEOUT = 1.0
TERMINAL = {"completed", "cancelled", "upstream_error", "timeout", "interrupted"}
SHUTDOWN_MODES = ("none", "exit", "drain", "scope")

# Virtual times are in milliseconds from the batch start. Scripted upstream events fall on whole
# milliseconds, route deadlines on .75, client actions on .5 and shutdowns on .25, so no two
# events of a trial ever share an instant unless a race trial puts them there on purpose.

# -- the scripted upstream --------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    header_ms: int
    fail_headers: bool
    status: int
    sse: bool
    chunks: tuple[bytes, ...]
    gaps_ms: tuple[int, ...]  # pause before each chunk (the first one after the headers)
    ending: Literal["eof", "fail", "stall"]
    end_gap_ms: int  # pause after the last chunk before the end (or the failure)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@functools.cache
def script_for(path: str) -> Script:
    """The upstream's behaviour for ``path``: deterministic, seeded by the path alone."""
    rng = random.Random(path)
    header_ms = rng.randint(1, 20) if rng.random() < 0.8 else rng.randint(20, 150)
    sse = rng.random() < 0.5
    n = rng.randint(0, 10)
    if sse:
        body = b"".join(
            f"id: {i}\ndata: {path} {i} ".encode() + b"x" * rng.randint(0, 60) + b"\n\n"
            for i in range(rng.randint(1, 8))
        )
    else:
        body = rng.randbytes(rng.randint(1, 600))
    cuts = sorted(rng.sample(range(1, len(body)), min(max(n - 1, 0), len(body) - 1)))
    bounds = [0, *cuts, len(body)] if n else [0]
    chunks = tuple(body[a:b] for a, b in itertools.pairwise(bounds))
    roll = rng.random()
    ending: Literal["eof", "fail", "stall"] = "eof" if roll < 0.6 else (
        "fail" if roll < 0.85 else "stall")
    return Script(
        header_ms=header_ms,
        fail_headers=rng.random() < 0.05,
        status=200 if rng.random() < 0.9 else 503,
        sse=sse,
        chunks=chunks,
        gaps_ms=tuple(rng.randint(0, 40) for _ in chunks),
        ending=ending,
        end_gap_ms=rng.randint(0, 40),
    )


class ScriptedStream(httpx.AsyncByteStream):
    def __init__(self, transport: ScriptedTransport, path: str, script: Script) -> None:
        self._transport = transport
        self._path = path
        self._script = script

    async def __aiter__(self) -> AsyncIterator[bytes]:
        script = self._script
        for gap, chunk in zip(script.gaps_ms, script.chunks, strict=True):
            await trio.sleep(gap / 1000)
            yield chunk
        if script.ending == "stall":
            await trio.sleep_forever()
        await trio.sleep(script.end_gap_ms / 1000)
        for _ in range(self._transport.reached_end(self._path)):
            await trio.lowlevel.checkpoint()
        if script.ending == "fail":
            raise httpx.ReadError("scripted: connection reset mid-body")

    async def aclose(self) -> None:
        self._transport.closed += 1


class ScriptedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that answers every request from :func:`script_for` (no sockets).

    ``on_end[path]`` is called synchronously at the instant the upstream is about to end that
    request on its own (clean end, failure mid-body, failure before the headers); it returns how
    many scheduler checkpoints the upstream takes before it actually ends.
    """

    def __init__(self) -> None:
        self.on_end: dict[str, Callable[[], int]] = {}
        self.requests = 0
        self.opened = 0  # response bodies handed to httpx
        self.closed = 0  # ... and closed by it again

    def reached_end(self, path: str) -> int:
        hook = self.on_end.pop(path, None)
        return 0 if hook is None else hook()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        path = request.url.path
        script = script_for(path)
        await trio.sleep(script.header_ms / 1000)
        if script.fail_headers:
            for _ in range(self.reached_end(path)):
                await trio.lowlevel.checkpoint()
            raise httpx.ConnectError("scripted: connection refused", request=request)
        ctype = "text/event-stream" if script.sse else "application/octet-stream"
        self.opened += 1
        return httpx.Response(
            script.status, headers=[("content-type", ctype)],
            stream=ScriptedStream(self, path, script), request=request,
        )


# -- routes, trials and the model -------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    name: str
    on_disconnect: Literal["finish", "cancel"]
    first_byte_ms: float = 120_000.0
    idle_ms: float = 120_000.0
    total_ms: float = 3_600_000.0
    finish_ms: float = 300_000.0

    def route(self) -> Route:
        return Route(
            prefix=f"/{self.name}/", upstream=f"http://scripted.test/{self.name}/",
            on_disconnect=self.on_disconnect, first_byte_timeout=self.first_byte_ms / 1000,
            idle_timeout=self.idle_ms / 1000, total_timeout=self.total_ms / 1000,
            finish_timeout=self.finish_ms / 1000,
        )


ROUTES = (
    RouteSpec("plain-finish", "finish"),
    RouteSpec("plain-cancel", "cancel"),
    RouteSpec("short-finish", "finish", finish_ms=25),
    RouteSpec("idle", "finish", idle_ms=20.75),
    RouteSpec("idle-cancel", "cancel", idle_ms=30.75),
    RouteSpec("total", "finish", total_ms=150.75, finish_ms=60),
    RouteSpec("first-byte", "cancel", first_byte_ms=12.75),
    RouteSpec("all", "finish", first_byte_ms=15.75, idle_ms=25.75, total_ms=300.75,
              finish_ms=40),
)

Action = Literal["none", "leave", "cancel", "race"]
RaceKind = Literal["cancel", "interrupt", "leave"]


@dataclass
class Trial:
    path: str
    route: RouteSpec
    script: Script
    action: Action
    at_ms: float = math.inf  # leave / cancel time
    race: RaceKind = "cancel"
    race_checkpoints: int = 0  # the action's checkpoints after the upstream's last moment
    upstream_checkpoints: int = 0  # the upstream's, before it actually ends
    # filled in while the batch runs
    stream: LiveStream | None = None
    handle: StreamHandle | None = None
    client_scope: trio.CancelScope | None = None
    got: bytes = b""
    read_to_end: bool = False
    raced_at: float | None = None
    race_landed: str = ""  # where the race action landed: "running", "persisting", "finished"
    done_at: float | None = None


@dataclass(frozen=True)
class Expected:
    end_ms: float
    status: str
    reason: str | None  # a prefix of the record's reason
    chunks: int  # scripted chunks in the journal
    natural: bool  # the upstream ended on its own (no deadline, action or shutdown first)
    alt: str | None = None  # another status allowed for a same-instant tie the test cannot order


def upstream_end(s: Script, r: RouteSpec) -> tuple[Expected, list[float]]:
    """How the stream ends with nobody acting on it, and when each chunk arrives."""
    times: list[float] = []
    first = min(r.first_byte_ms, r.total_ms)
    if s.header_ms > first:
        reason = "total_timeout" if r.total_ms <= r.first_byte_ms else "first_byte_timeout"
        return Expected(first, "timeout", reason, 0, False), times
    t = float(s.header_ms)
    if s.fail_headers:
        return Expected(t, "upstream_error", "connect failed", 0, True), times
    gaps = [*s.gaps_ms, math.inf if s.ending == "stall" else s.end_gap_ms]
    # The idle deadline is re-armed lazily (keepstream._supervisor.idle_slack): armed at
    # t + idle + slack, and again only after a chunk that finds it less than idle away.
    slack = idle_slack(r.idle_ms / 1000) * 1000
    armed = t + r.idle_ms + slack
    for i, gap in enumerate(gaps):
        deadline = min(r.total_ms, armed)
        if t + gap > deadline:
            reason = "total_timeout" if deadline >= r.total_ms else "idle_timeout"
            return Expected(deadline, "timeout", reason, len(times), False), times
        t += gap
        if i < len(s.chunks):
            times.append(t)
            if t + r.idle_ms > armed:
                armed = t + r.idle_ms + slack
    if s.ending == "eof":
        return Expected(t, "completed", None, len(times), True), times
    return Expected(t, "upstream_error", "ReadError", len(times), True), times


def expect(trial: Trial, shutdown: tuple[str, float, float] | None) -> Expected:
    """The outcome of a trial, from its script, route, action and the batch's shutdown."""
    r = trial.route
    base, times = upstream_end(trial.script, r)
    # (time, status, reason, alt) of everything that acts on the stream from outside
    events: list[tuple[float, str, str | None, str | None]] = []
    if trial.action == "cancel":
        events.append((trial.at_ms, "cancelled", "test cancel", None))
    if trial.action == "leave":
        if r.on_disconnect == "cancel":
            events.append((trial.at_ms, "cancelled", "client disconnected", None))
        elif trial.at_ms + r.finish_ms < r.total_ms:
            events.append((trial.at_ms + r.finish_ms, "timeout", "finish_timeout", None))
    if shutdown is not None:
        mode, s_ms, d_ms = shutdown
        if mode == "scope":
            # Cancelling the block cancels the stream tasks at once (interrupted, reason
            # "shutdown") and makes their clients leave in the same instant: on a "cancel"
            # route the client's leaving may be seen first (cancelled).
            alt = "cancelled" if r.on_disconnect == "cancel" else None
            events.append((s_ms, "interrupted", "shutdown", alt))
        else:
            events.append((s_ms + d_ms, "interrupted", "shutdown after drain deadline", None))
    best = base
    for at, status, reason, alt in events:
        if at < best.end_ms:
            best = Expected(at, status, reason, sum(1 for t in times if t < at), False, alt)
    return best


def make_trials(rng: random.Random, batch: int, n: int) -> list[Trial]:
    trials = []
    for i in range(n):
        route = rng.choice(ROUTES)
        path = f"/{route.name}/b{batch}/t{i}"
        roll = rng.random()
        action: Action = "none" if roll < 0.15 else "leave" if roll < 0.4 else (
            "cancel" if roll < 0.65 else "race")
        trial = Trial(path, route, script_for(path), action)
        if action in ("leave", "cancel"):
            trial.at_ms = rng.randint(0, 500) + 0.5
        if action == "race":
            trial.race = rng.choice(("cancel", "interrupt", "leave"))
            trial.race_checkpoints = rng.randint(0, 8)
            trial.upstream_checkpoints = rng.randint(0, 3)
        trials.append(trial)
    return trials


# -- journal history: no half-written or rewritten terminal row -------------------------------


class History:
    """Watches every transaction of a :class:`MemoryBackend` (wraps its ``commit``)."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.first_terminal: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self._commit = backend.commit
        backend.commit = self.commit  # type: ignore[method-assign]

    def commit(self, batch: Batch) -> None:
        for sid, _offset, data, _, _ in batch.chunks:
            if sid in self.first_terminal:
                self.problems.append(f"{sid}: {len(data)} body bytes after its terminal row")
        self._commit(batch)
        for row in batch.rows:
            sid = row["id"]
            first = self.first_terminal.get(sid)
            if first is not None:
                if row != first:
                    self.problems.append(f"{sid}: terminal row rewritten: {first} -> {row}")
            elif row["status"] != "open":
                self.first_terminal[sid] = dict(row)
                durable = len(self.backend.bodies.get(sid, b""))
                if row["bytes"] != durable:
                    self.problems.append(
                        f"{sid}: terminal row says {row['bytes']} bytes, {durable} durable")


# -- one batch --------------------------------------------------------------------------------


@dataclass
class BatchResult:
    trials: int = 0
    bad_records: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    #: race trials by (kind, where the action landed, whether it decided the status)
    races: Counter[tuple[str, str, bool]] = field(default_factory=Counter)

    def add(self, other: BatchResult) -> None:
        self.trials += other.trials
        self.bad_records += other.bad_records
        self.mismatches += other.mismatches
        self.statuses += other.statuses
        self.races += other.races


def make_config(drain_ms: float) -> Config:
    return Config(
        routes=tuple(r.route() for r in ROUTES),
        server=ServerConfig(bind="127.0.0.1:0", drain_timeout=drain_ms / 1000, stop_grace=10.0,
                            persist_timeout=PERSIST_TIMEOUT, max_streams=100_000),
        journal=JournalConfig(url="memory:", flush_interval_ms=20),
    )


async def run_batch(mode: str, batch: int, n: int) -> BatchResult:
    """Run ``n`` concurrent trials through one ``open_proxy``; check every record."""
    rng = random.Random(f"row20-{mode}-{batch}")
    trials = make_trials(rng, batch, n)
    drain_ms = float(rng.randint(5, 150))
    if mode == "none":
        # No shutdown to model: leaving the block at the end must let every stream end on
        # its own (idle timeouts of the 120 s routes spread over idle_slack = 0.25 s).
        drain_ms = 5000.0
    shutdown: tuple[str, float, float] | None = None
    if mode != "none":
        s_ms = rng.randint(30, 400) + 0.25
        d_ms = float(rng.randint(5, 150)) if mode == "drain" else drain_ms
        shutdown = (mode, s_ms, d_ms)
    transport = ScriptedTransport()
    cfg = make_config(drain_ms)
    t0 = trio.current_time()
    sup_ref: list[Supervisor] = []
    history_ref: list[History] = []

    def at(ms: float) -> float:
        return t0 + ms / 1000

    async def client(trial: Trial, proxy: Proxy) -> None:
        got = bytearray()
        try:
            with trio.CancelScope() as scope:
                trial.client_scope = scope
                if trial.action == "leave":
                    scope.deadline = at(trial.at_ms)
                async with proxy.open_stream("GET", trial.path) as handle:
                    trial.handle = handle
                    async for chunk in handle:
                        got += chunk
                trial.read_to_end = True
        finally:
            trial.got = bytes(got)

    async def watch(trial: Trial) -> None:
        assert trial.stream is not None
        await trial.stream.done.wait()
        trial.done_at = trio.current_time()

    async def cancel_later(trial: Trial, sup: Supervisor) -> None:
        await trio.sleep_until(at(trial.at_ms))
        live = sup.live.get(trial.stream.record.id) if trial.stream is not None else None
        if live is not None:
            live.stop(Ending.CANCEL_REQUESTED, "test cancel")

    def race_hook(trial: Trial, nursery: trio.Nursery) -> Callable[[], int]:
        def hook() -> int:
            trial.raced_at = trio.current_time()
            nursery.start_soon(race, trial)
            return trial.upstream_checkpoints

        return hook

    async def race(trial: Trial) -> None:
        for _ in range(trial.race_checkpoints):
            await trio.lowlevel.checkpoint()
        assert trial.stream is not None
        if trial.stream.finished:
            trial.race_landed = "finished"
        elif trial.stream.record.status != "open":
            trial.race_landed = "persisting"
        else:
            trial.race_landed = "running"
        if trial.race == "cancel":
            trial.stream.stop(Ending.CANCEL_REQUESTED, "race cancel")
        elif trial.race == "interrupt":
            trial.stream.stop(Ending.SHUTDOWN, "race interrupt")
        elif trial.client_scope is not None:
            trial.client_scope.cancel()

    async with httpx.AsyncClient(transport=transport, trust_env=False) as http:
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as whole:
                if shutdown is not None and mode == "scope":

                    async def cancel_whole() -> None:
                        await trio.sleep_until(at(shutdown[1]))
                        whole.cancel()

                    outer.start_soon(cancel_whole)
                async with open_proxy(cfg, client=http) as proxy:
                    sup = proxy.supervisor
                    sup_ref.append(sup)
                    backend = sup.writer.backend
                    assert isinstance(backend, MemoryBackend)
                    history_ref.append(History(backend))
                    async with trio.open_nursery() as inner:
                        clients = outer if mode == "exit" else inner
                        for trial in trials:
                            clients.start_soon(client, trial, proxy)
                        while sup.started_total < n:
                            await trio.lowlevel.checkpoint()
                        assert trio.current_time() == t0, "stream start-up took virtual time"
                        by_path = {s.record.path: s for s in sup.live.values()}
                        assert len(by_path) == n
                        for trial in trials:
                            trial.stream = by_path[trial.path]
                            outer.start_soon(watch, trial)
                            if trial.action == "cancel":
                                outer.start_soon(cancel_later, trial, sup)
                            elif trial.action == "race":
                                transport.on_end[trial.path] = race_hook(trial, outer)
                        if shutdown is not None and mode == "drain":

                            async def drain() -> None:
                                await trio.sleep_until(at(shutdown[1]))
                                await sup.drain(shutdown[2] / 1000)

                            inner.start_soon(drain)
                        if shutdown is not None and mode == "exit":
                            await trio.sleep_until(at(shutdown[1]))
        assert transport.requests == n
        assert transport.closed == transport.opened, "an upstream response was left open"

    sup = sup_ref[0]
    history = history_ref[0]
    backend = sup.writer.backend
    assert isinstance(backend, MemoryBackend)
    result = BatchResult(trials=n)
    assert not sup.live
    assert sup.writer.failures == 0, sup.writer.last_error
    result.bad_records += history.problems
    if len(backend.rows) != n:
        result.bad_records.append(f"batch {batch}: {len(backend.rows)} records for {n} trials")
    for trial in trials:
        check_trial(trial, backend, shutdown, t0, result)
    return result


def check_trial(
    trial: Trial,
    backend: MemoryBackend,
    shutdown: tuple[str, float, float] | None,
    t0: float,
    result: BatchResult,
) -> None:
    assert trial.stream is not None
    sid = trial.stream.record.id
    row = backend.rows.get(sid)
    script = trial.script
    if row is None:
        result.bad_records.append(f"{trial.path}: no record")
        return
    body = bytes(backend.bodies.get(sid, b""))
    status = row["status"]
    result.statuses[status] += 1
    # J: what every record must satisfy, whatever the interleaving.
    problems = []
    if status not in TERMINAL:
        problems.append(f"status {status!r} is not terminal")
    if row["path"] != trial.path:
        problems.append(f"path {row['path']!r}")
    if not script.body.startswith(body):
        problems.append(f"body ({len(body)} bytes) is not a prefix of the scripted bytes")
    if row["bytes"] != len(body):
        problems.append(f"bytes {row['bytes']} != journaled body {len(body)}")
    if status == "completed" and body != script.body:
        problems.append(f"completed with {len(body)} of {len(script.body)} bytes")
    if problems:
        result.bad_records.append(f"{trial.path} [{sid}] {row}: " + "; ".join(problems))
        return

    # The model: exact status, reason, body, end instant for every deterministic trial.
    exp = expect(trial, shutdown)
    allowed = {exp.status} if exp.alt is None else {exp.status, exp.alt}
    if trial.action == "race" and exp.natural:
        assert trial.raced_at is not None, f"{trial.path}: the race hook never ran"
        if trial.race == "cancel" or (
            trial.race == "leave" and trial.route.on_disconnect == "cancel"
        ):
            allowed.add("cancelled")
        elif trial.race == "interrupt":
            allowed.add("interrupted")
        result.races[trial.race, trial.race_landed, status != exp.status] += 1
    want_body = b"".join(script.chunks[: exp.chunks])
    mism = []
    if status not in allowed:
        mism.append(f"status {status!r}, expected {sorted(allowed)}")
    if status == exp.status and exp.reason is not None and not str(row["reason"]).startswith(
        exp.reason
    ):
        mism.append(f"reason {row['reason']!r}, expected {exp.reason!r}...")
    if status == "completed" and row["reason"] is not None:
        mism.append(f"completed with reason {row['reason']!r}")
    if body != want_body:
        mism.append(f"body {len(body)} bytes, expected {len(want_body)}")
    headers_seen = not script.fail_headers and script.header_ms <= exp.end_ms
    if row["upstream_status"] != (script.status if headers_seen else None):
        mism.append(f"upstream_status {row['upstream_status']}, headers_seen={headers_seen}")
    assert trial.done_at is not None
    lag = trial.done_at - (t0 + exp.end_ms / 1000)
    if abs(lag) > 1e-6:
        mism.append(f"persisted {lag * 1000:+.3f} ms after the expected end")
    if trial.got != body[: len(trial.got)]:
        mism.append("the client got bytes that are not a prefix of the journal")
    if trial.read_to_end and trial.got != body:
        mism.append(f"client read to the end but got {len(trial.got)} of {len(body)} bytes")
    if mism:
        result.mismatches.append(
            f"{trial.path} action={trial.action}/{trial.race} at={trial.at_ms} "
            f"shutdown={shutdown} script={script} expected={exp} row={row}: " + "; ".join(mism)
        )


# -- the test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", SHUTDOWN_MODES)
async def test_row20_cancel_racing_the_final_persist(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    """``BATCHES`` x ``BATCH_SIZE`` interleavings per shutdown mode (12,000 in all by default).

    Modes: ``none`` (no shutdown), ``exit`` (the ``open_proxy`` block ends part-way: drain for
    ``drain_timeout``, then interrupt), ``drain`` (``supervisor.drain(t)`` part-way, inside the
    block), ``scope`` (the block is cancelled from outside part-way).
    """
    started = time.perf_counter()
    total = BatchResult()
    for batch in range(BATCHES):
        total.add(await run_batch(mode, batch, BATCH_SIZE))
    took = time.perf_counter() - started
    won = sum(n for (_k, _w, decided), n in total.races.items() if decided)
    landed = Counter[str]()
    for (_kind, where, _decided), n in total.races.items():
        landed[where] += n
    print(
        f"\nrow 20 [{mode}]: {total.trials} interleavings, {len(total.bad_records)} bad records, "
        f"{len(total.mismatches)} model mismatches, {took:.1f} s\n"
        f"  statuses {dict(sorted(total.statuses.items()))}\n"
        f"  race actions landed {dict(landed)}; the action decided the status in {won} of "
        f"{landed.total()}"
    )
    assert not total.bad_records, (
        f"{len(total.bad_records)} bad records in {total.trials} trials, the first 20:\n"
        + "\n".join(total.bad_records[:20])
    )
    assert not total.mismatches, (
        f"{len(total.mismatches)} outcomes differ from the model, the first 20:\n"
        + "\n".join(total.mismatches[:20])
    )
    assert total.trials == BATCHES * BATCH_SIZE
    if BATCHES * BATCH_SIZE >= 1000:
        # The sample reaches every side of the race: the action deciding the status, the
        # upstream's end deciding it with the action landing inside the shielded persist.
        assert 0 < won < landed.total()
        assert landed["persisting"] > 0
