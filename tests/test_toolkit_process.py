"""keepstream.testing's subprocess harness: ``keepstream serve`` as users deploy it, with real
signals. A SIGTERM mid-stream drains and exits 0 with the record ``interrupted``; a SIGKILL
leaves the record ``open`` until the next start orphans it; the fixture never leaves a process
behind. Loopback only, bounded."""

from __future__ import annotations

import signal
import tomllib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream._journal import SQLiteBackend
from keepstream.testing import (
    FakeResponseSpec,
    FakeUpstream,
    KeepstreamProcess,
    chaos_request,
    start_keepstream_process,
)
from keepstream.testing._process import config_toml

Factory = Callable[..., AbstractAsyncContextManager[KeepstreamProcess]]


def _config(upstream: str, db: Path) -> Config:
    return Config(
        routes=(Route(prefix="/", upstream=upstream, client_keys_sha256=("a" * 64,)),),
        server=ServerConfig(drain_timeout=0.5, stop_grace=5.0),
        journal=JournalConfig(url=f"sqlite:///{db}", flush_interval_ms=20),
    )


def _rows(db: Path) -> list[dict[str, object]]:
    backend = SQLiteBackend(str(db))
    backend.setup()
    try:
        return backend.list_records(None, 100)
    finally:
        backend.close()


def test_config_toml_round_trips(tmp_path: Path) -> None:
    cfg = _config("http://127.0.0.1:9/v1/", tmp_path / "j.db")
    assert Config.from_mapping(tomllib.loads(config_toml(cfg))) == cfg


async def test_sigterm_drains_and_records_interrupted(
    fake_upstream: FakeUpstream, tmp_path: Path, keepstream_process_factory: Factory
) -> None:
    db = tmp_path / "j.db"
    cfg = _config(fake_upstream.url, db).replace(
        routes=(Route(prefix="/", upstream=fake_upstream.url),))
    spec = FakeResponseSpec(events=1000, interval=0.05, style="plain")
    with trio.fail_after(30):
        async with keepstream_process_factory(cfg) as ks, trio.open_nursery() as nursery:
            results = []

            async def client() -> None:
                results.append(await chaos_request(ks.port, "GET", "/long",
                                                   headers=spec.headers(), timeout=20))

            nursery.start_soon(client)
            await fake_upstream.wait_exchanges(1)
            await trio.sleep(0.3)
            ks.send_signal(signal.SIGTERM)
            assert await ks.wait() == 0
    (row,) = _rows(db)
    assert row["status"] == "interrupted"
    assert results and results[0].status == 200


async def test_sigkill_leaves_open_then_restart_orphans(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    cfg = _config(fake_upstream.url, db).replace(
        routes=(Route(prefix="/", upstream=fake_upstream.url),))
    spec = FakeResponseSpec(events=1000, interval=0.05, style="plain")
    with trio.fail_after(40):
        ks = await start_keepstream_process(cfg, workdir=tmp_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: chaos_request(ks.port, "GET", "/k",
                                                         headers=spec.headers(), timeout=20))
                await fake_upstream.wait_exchanges(1)
                await trio.sleep(0.3)
                ks.kill()
                assert await ks.wait() == -signal.SIGKILL
                nursery.cancel_scope.cancel()
        finally:
            ks.kill()
        (row,) = _rows(db)
        assert row["status"] == "open"
        again = await start_keepstream_process(tmp_path / "keepstream.toml")
        try:
            (row,) = _rows(db)
            assert row["status"] == "orphaned"
        finally:
            again.send_signal(signal.SIGTERM)
            assert await again.wait() == 0


async def test_plain_flags_without_a_config_file(
    fake_upstream: FakeUpstream, tmp_path: Path, keepstream_process_factory: Factory
) -> None:
    """``config=None``: ``keepstream serve --bind 127.0.0.1:0 [flags]``, no ``--config``; the
    command line shows it, and the flags alone configure the proxy."""
    db = tmp_path / "flags.db"
    with trio.fail_after(30):
        async with keepstream_process_factory(None, "--upstream", fake_upstream.url,
                                              "--journal", f"sqlite:///{db}") as ks:
            assert ks.url == f"http://127.0.0.1:{ks.port}"
            argv = ks.proc.args
            assert isinstance(argv, list)
            assert argv[1:] == ["-m", "keepstream", "serve", "--bind", "127.0.0.1:0",
                                "--upstream", fake_upstream.url, "--journal", f"sqlite:///{db}"]
            res = await chaos_request(ks.port, "POST", "/echo", body=b"flags")
            assert res.status == 200 and res.body == b"flags"
    assert ks.returncode == 0, ks.stderr()[-2000:]
    assert ks.stderr_path.parent == tmp_path
    (row,) = _rows(db)
    assert row["status"] == "completed"
