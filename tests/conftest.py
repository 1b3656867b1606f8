"""Shared fixtures for keepstream's own tests.

Test rules (as trio-websocket states them): loopback only, port 0, every network test bounded by
``trio.fail_after``, ``autojump_clock`` wherever no real socket is involved. The fake upstream,
fault proxy, chaos client, canary listener and the in-process and subprocess servers come from
``keepstream.testing`` (the public toolkit, loaded as a pytest plugin): there is no second
private copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keepstream import Config, JournalConfig, Route, ServerConfig


def make_config(
    upstream_url: str,
    journal_url: str,
    *,
    on_disconnect: str = "finish",
    server: ServerConfig | None = None,
    **route_kw: object,
) -> Config:
    route = Route(prefix="/", upstream=upstream_url, on_disconnect=on_disconnect,  # type: ignore[arg-type]
                  **route_kw)  # type: ignore[arg-type]
    return Config(
        routes=(route,),
        server=server or ServerConfig(bind="127.0.0.1:0", drain_timeout=2.0, stop_grace=10.0),
        journal=JournalConfig(url=journal_url, flush_interval_ms=20),
    )


@pytest.fixture
def journal_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'journal.db'}"
