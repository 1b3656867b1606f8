"""The CLI of DESIGN section 4, as a user runs it: a real ``keepstream serve`` subprocess
(the toolkit's process harness, here with plain flags and no config file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from keepstream._cli import main
from keepstream.testing import FakeResponseSpec, FakeUpstream, chaos_request, run_keepstream_process

KEEPSTREAM = [sys.executable, "-m", "keepstream"]

#: The record fields of DESIGN section 4, in its order (spelled out, not imported from the code).
DESIGN_RECORD_FIELDS = [
    "id", "route", "method", "path", "status", "reason", "upstream_status", "created_at",
    "first_byte_at", "ended_at", "client_gone_at", "bytes", "events", "detached",
]


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KEEPSTREAM, *args], capture_output=True, timeout=30, check=False)


async def test_serve_proxies_sse_and_post_byte_for_byte(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    journal = f"sqlite:///{tmp_path / 'ks.db'}"
    spec = FakeResponseSpec(events=25, style="llm", interval=0.002)
    payload = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    # No --config: `keepstream serve --bind 127.0.0.1:0 --upstream URL --journal URL`. Leaving
    # the block sends SIGTERM and waits up to 10 s (then SIGKILL, and the exit code says so).
    async with run_keepstream_process(None, "--upstream", fake_upstream.url, "--journal", journal,
                                      workdir=tmp_path, stop_timeout=10) as server:
        assert server.url.startswith("http://127.0.0.1:"), server.url
        with trio.fail_after(20):
            sse = await chaos_request(server.port, "GET", "/v1/chat", headers=spec.headers())
            post = await chaos_request(server.port, "POST", "/echo", body=payload,
                                       headers=[("Content-Type", "application/json")])
    assert server.returncode == 0, server.stderr()[-2000:]
    assert sse.status == 200 and sse.complete and sse.body == spec.expected_body()
    assert post.status == 200 and post.body == payload
    for res, expected in ((sse, spec.expected_body()), (post, payload)):
        sid = res.header("keepstream-id")
        assert sid is not None
        body = _cli("streams", "show", sid.decode(), "--journal", journal, "--body")
        assert body.returncode == 0 and body.stdout == expected
        shown = _cli("streams", "show", sid.decode(), "--journal", journal, "--json")
        assert shown.returncode == 0, shown.stderr
        rec = json.loads(shown.stdout)
        assert list(rec) == DESIGN_RECORD_FIELDS
        assert rec["status"] == "completed" and rec["bytes"] == len(expected)
        assert rec["ended_at"].endswith("Z") and rec["client_gone_at"] is None
    listed = json.loads(_cli("streams", "list", "--journal", journal, "--json").stdout)
    assert len(listed) == 2
    table = _cli("streams", "list", "--journal", journal).stdout.decode()
    assert "completed" in table and "status" in table.splitlines()[0]


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[server]\nbind = "127.0.0.1:8080"\ndrain_timeout = 8.0\nstop_grace = 10.0\n'
        '[journal]\nurl = "sqlite:///x.db"\n'
        '[[routes]]\nprefix = "/v1/"\nupstream = "http://127.0.0.1:9000/v1/"\n'
        'on_disconnect = "cancel"\nfinish_timeout = 300.0\nresumable = false\n'
    )
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\ndrain_timeout = 9.0\nstop_grace = 10.0\n')
    assert main(["check-config", str(bad)]) == 2
    assert "server.stop_grace" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[[routes]]\nprefix = "/"\nupstream = "http://h:1"\nfinsh_timeout = 3\n')
    assert main(["check-config", str(unknown)]) == 2
    assert "routes[0].finsh_timeout: unknown key" in capsys.readouterr().err


def test_streams_show_unknown_id(tmp_path: Path) -> None:
    journal = f"sqlite:///{tmp_path / 'none.db'}"
    assert _cli("streams", "list", "--journal", journal).returncode == 1
    res = _cli("streams", "show", "deadbeef", "--journal", "memory:")
    assert res.returncode == 1 and b"no stream" in res.stderr


def test_serve_without_routes_is_a_config_error() -> None:
    res = _cli("serve", "--bind", "127.0.0.1:0", "--journal", "none")
    assert res.returncode == 2 and b"routes" in res.stderr


def test_serve_with_an_unset_upstream_credential_exits_2(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('[server]\nbind = "127.0.0.1:0"\n[journal]\nurl = "memory:"\n'
                    '[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:9/"\n'
                    'upstream_bearer_env = "KS_TEST_SURELY_UNSET"\n')
    proc = subprocess.run([sys.executable, "-m", "keepstream", "serve", "--config", str(toml)],
                          capture_output=True, timeout=30,
                          env={k: v for k, v in os.environ.items()
                               if k != "KS_TEST_SURELY_UNSET"})
    assert proc.returncode == 2, proc.stderr
    assert b"routes[0].upstream_bearer_env" in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_environment_overrides_the_file_and_flags_override_the_environment(
    tmp_path: Path,
) -> None:
    import argparse

    from keepstream import ConfigError
    from keepstream._cli import build_config

    toml = tmp_path / "k.toml"
    toml.write_text('[server]\nmax_streams = 10\nworkers = 1\n[[routes]]\nprefix = "/"\n'
                    'upstream = "http://127.0.0.1:9/"\n')
    env = {"KEEPSTREAM_MAX_STREAMS": "20000", "KEEPSTREAM_WORKERS": "3"}
    args = argparse.Namespace(config=str(toml), workers=2)
    cfg = build_config(args, env)
    assert cfg.server.max_streams == 20000 and cfg.server.workers == 2
    with pytest.raises(ConfigError) as info:
        build_config(argparse.Namespace(config=str(toml)), {"KEEPSTREAM_MAX_STREAMS": "many"})
    assert "max_streams" in str(info.value) and "KEEPSTREAM_MAX_STREAMS" in str(info.value)
