"""Credentials and limits (issue 7) and stream-task policies, on a real Hypercorn in front of
the fake upstream with a real SQLite journal.

* ``routes[].client_keys_sha256``: no or a wrong ``Authorization: Bearer`` key answers 401 before
  anything reaches the upstream; the client's key never reaches the upstream nor the journal.
* ``routes[].upstream_bearer_env``: keepstream sends the route's own credential upstream (over
  HTTP and through ``proxy.open_stream``); an unset variable fails start-up with
  ``ConfigError`` naming the key, before anything is opened.
* ``routes[].max_streams`` and ``server.max_streams_per_client``: 429 with ``Retry-After``;
  ``server.max_headers``: 431.
* ``routes[].connect_timeout`` is the route's own (a listener whose backlog is full never
  completes the handshake).
* A stream whose record the journal cannot confirm within ``persist_timeout`` is refused (503)
  and its row ends terminal, never ``open``.
* A second signal closes the ``drain_delay`` window.

Loopback only, every test bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from keepstream import (
    Config,
    ConfigError,
    JournalConfig,
    Route,
    ServerConfig,
    open_proxy,
)
from keepstream._journal import open_backend
from keepstream.testing import FakeResponseSpec, FakeUpstream, run_keepstream

KEY = "client-key-7f3a"
UPSTREAM_SECRET = "upstream-secret-91c2"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _config(upstream: str, db: Path, *, server: ServerConfig | None = None,
            **route_kw: object) -> Config:
    route = Route(prefix="/", upstream=upstream, **route_kw)  # type: ignore[arg-type]
    return Config(
        routes=(route,),
        server=server or ServerConfig(drain_timeout=1.0, stop_grace=10.0),
        journal=JournalConfig(url=f"sqlite:///{db}", flush_interval_ms=20),
    )


def _rows(db: Path) -> list[dict[str, object]]:
    backend = open_backend(f"sqlite:///{db}")
    backend.setup()
    try:
        return backend.list_records(None, 1000)
    finally:
        backend.close()


def _journal_text(db: Path) -> bytes:
    """Every byte of the journal file and its WAL (what an attacker with the disk would see)."""
    out = b""
    for p in (db, Path(str(db) + "-wal")):
        if p.exists():
            out += p.read_bytes()
    return out


async def test_client_key_required_and_never_forwarded_or_journaled(
    fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KS_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    db = tmp_path / "j.db"
    cfg = _config(fake_upstream.url, db, client_keys_sha256=(_sha(KEY),),
                  upstream_bearer_env="KS_TEST_UPSTREAM_KEY")
    spec = FakeResponseSpec(events=3, style="plain")
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks, \
                httpx.AsyncClient(base_url=ks.url, trust_env=False) as client:
            for auth in (None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"):
                headers = dict(spec.headers())
                if auth is not None:
                    headers["authorization"] = auth
                resp = await client.get("/a", headers=headers)
                assert resp.status_code == 401, (auth, resp.text)
                assert resp.headers["www-authenticate"].startswith("Bearer")
            assert fake_upstream.exchanges == []
            headers = dict(spec.headers())
            headers["authorization"] = f"Bearer {KEY}"
            resp = await client.get("/a", headers=headers)
            assert resp.status_code == 200
            assert resp.content == spec.expected_body()
    (ex,) = fake_upstream.exchanges
    assert ex.header("authorization") == f"Bearer {UPSTREAM_SECRET}"
    assert all(KEY.encode() not in v for _, v in ex.request_headers)
    (row,) = _rows(db)
    assert row["status"] == "completed"
    text = _journal_text(db)
    assert KEY.encode() not in text and UPSTREAM_SECRET.encode() not in text


async def test_upstream_credential_through_open_stream(
    fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KS_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    cfg = _config(fake_upstream.url, tmp_path / "j.db",
                  upstream_bearer_env="KS_TEST_UPSTREAM_KEY")
    spec = FakeResponseSpec(events=2, style="plain")
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy, proxy.open_stream(
            "GET", "/x", headers=[*spec.headers(), ("authorization", "Bearer embedder")]
        ) as handle:
            body = b"".join([chunk async for chunk in handle])
    assert body == spec.expected_body()
    (ex,) = fake_upstream.exchanges
    assert ex.header("authorization") == f"Bearer {UPSTREAM_SECRET}"


async def test_unset_upstream_credential_fails_before_anything_opens(
    fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KS_TEST_UNSET_VAR", raising=False)
    db = tmp_path / "j.db"
    cfg = _config(fake_upstream.url, db, upstream_bearer_env="KS_TEST_UNSET_VAR")
    with pytest.raises(ConfigError) as info:
        async with open_proxy(cfg):
            pytest.fail("open_proxy must not start")  # pragma: no cover
    assert info.value.key == "routes[0].upstream_bearer_env"
    assert "KS_TEST_UNSET_VAR" in str(info.value)
    assert not db.exists()


async def test_per_route_and_per_client_limits_answer_429(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    cfg = _config(fake_upstream.url, tmp_path / "j.db", max_streams=2,
                  server=ServerConfig(drain_timeout=1.0, stop_grace=10.0,
                                      max_streams_per_client=1, max_headers=20))
    slow = FakeResponseSpec(events=1, style="plain", stall_after=0)
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks, \
                httpx.AsyncClient(base_url=ks.url, trust_env=False, timeout=10) as client, \
                trio.open_nursery() as nursery:

            async def hold(who: str) -> None:
                headers = {**dict(slow.headers()), "authorization": who}
                async with client.stream("GET", "/s", headers=headers):
                    await trio.sleep_forever()

            nursery.start_soon(hold, "alice")
            await fake_upstream.wait_exchanges(1)
            # alice has one live stream: her second is refused, bob's is not
            resp = await client.get("/s", headers={"authorization": "alice"})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
            assert "client" in resp.json()["error"]
            nursery.start_soon(hold, "bob")
            await fake_upstream.wait_exchanges(2)
            # the route holds two: carol's is refused by the route limit
            resp = await client.get("/s", headers={"authorization": "carol"})
            assert resp.status_code == 429 and "route" in resp.json()["error"]
            many = {f"x-h{i}": "v" for i in range(25)}
            resp = await client.get("/s", headers=many)
            assert resp.status_code == 431
            assert len(fake_upstream.exchanges) == 2
            nursery.cancel_scope.cancel()


@contextmanager
def _full_backlog_listener() -> Iterator[int]:
    """A listener that never accepts, its backlog filled: a new connect() never completes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        yield port
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_route_connect_timeout_is_the_routes_own(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    with _full_backlog_listener() as port:
        cfg = _config(f"http://127.0.0.1:{port}/", db, connect_timeout=0.3)
        with trio.fail_after(20):
            async with run_keepstream(cfg) as ks, \
                    httpx.AsyncClient(base_url=ks.url, trust_env=False) as client:
                start = trio.current_time()
                resp = await client.get("/never")
                took = trio.current_time() - start
    assert resp.status_code == 504, resp.text
    assert took < 5.0  # the server-wide default is 10 s
    (row,) = _rows(db)
    assert row["status"] == "timeout" and row["reason"] == "connect_timeout"


async def test_unconfirmed_record_is_refused_and_never_left_open(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    cfg = _config(fake_upstream.url, db,
                  server=ServerConfig(drain_timeout=1.0, stop_grace=10.0, persist_timeout=0.3))
    with trio.fail_after(30):
        async with run_keepstream(cfg) as ks:
            locker = sqlite3.connect(db, isolation_level=None, timeout=0)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                async with httpx.AsyncClient(base_url=ks.url, trust_env=False) as client:
                    resp = await client.get("/x")
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert fake_upstream.exchanges == []
            # once the journal writes again, the queued row lands terminal
            for _ in range(100):
                rows = _rows(db)
                if rows and rows[0]["status"] != "open":
                    break
                await trio.sleep(0.05)
    (row,) = _rows(db)
    assert row["status"] == "interrupted", row
    assert "refused" in str(row["reason"])


async def test_second_signal_closes_the_drain_delay_window(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    cfg = _config(fake_upstream.url, tmp_path / "j.db",
                  server=ServerConfig(drain_delay=5.0, drain_timeout=1.0, stop_grace=10.0))
    with trio.fail_after(20):
        async with open_proxy(cfg) as proxy:
            sup = proxy.supervisor
            sup.begin_drain()
            assert sup.draining and sup.accepting()  # the drain_delay window
            sup.interrupt_all("second signal")
            assert not sup.accepting()


def test_config_rejects_non_positive_persist_timeout() -> None:
    base = Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:1/"),))
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError) as info:
            dataclasses.replace(base, server=ServerConfig(persist_timeout=bad)).validate()
        assert info.value.key == "server.persist_timeout"
