"""``keepstream demo``: the main job end to end on embedded defaults.

A built-in fake LLM upstream (``keepstream.testing``), keepstream on loopback with a SQLite
journal in a temporary directory, and three clients a person can follow live:

1. one reads a completion to the end;
2. one leaves mid-stream on a ``finish`` route: keepstream keeps fetching into the journal and the
   record ends ``completed`` with the full body;
3. one leaves mid-stream on a ``cancel`` route: the upstream is closed and the record ends
   ``cancelled`` with the bytes that arrived.

It ends with the journal as a table and checks each record against what the upstream sent;
the exit status is 0 only if every check holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

from ._cli import format_table
from ._config import Config, JournalConfig, Route, ServerConfig
from .testing import FakeResponseSpec, FakeUpstream, run_fake_upstream, run_keepstream

_EVENTS = 40
_INTERVAL = 0.04


def _token(line: bytes) -> str:
    if not line.startswith(b"data: "):
        return ""
    payload = line[6:]
    if payload == b"[DONE]":
        return ""
    try:
        obj: Any = json.loads(payload)
        return str(obj["choices"][0]["delta"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


class _View:
    def __init__(self, live: bool) -> None:
        self.live = live

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def token(self, text: str) -> None:
        if self.live:
            sys.stdout.write(text)
            sys.stdout.flush()


async def _client(
    view: _View, url: str, spec: FakeResponseSpec, leave_after: int | None
) -> str:
    """Stream one completion; return its Keepstream-Id."""
    events = 0
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client, \
            client.stream("GET", url, headers=spec.headers()) as resp:
        sid = resp.headers["keepstream-id"]
        view.say(f"   keepstream-id {sid}, HTTP {resp.status_code}")
        view.token("   > ")
        buf = b""
        with trio.CancelScope() as scope:  # cancelling finishes httpx's generators cleanly
            async for chunk in resp.aiter_raw():
                buf += chunk
                while b"\n\n" in buf and not scope.cancel_called:
                    event, buf = buf.split(b"\n\n", 1)
                    events += 1
                    view.token(_token(event))
                    if leave_after is not None and events >= leave_after:
                        view.token(" ...")
                        view.say()
                        view.say(f"   client LEFT after {events} events")
                        scope.cancel()
        if scope.cancelled_caught:
            return sid
    view.say()
    view.say(f"   client read all {events} events")
    return sid


async def _demo(live: bool) -> bool:
    view = _View(live)
    ok = True
    with tempfile.TemporaryDirectory(prefix="keepstream-demo-") as tmp:
        journal = f"sqlite:///{Path(tmp) / 'keepstream.db'}"
        async with trio.open_nursery() as nursery:
            upstream: FakeUpstream = await nursery.start(run_fake_upstream)
            config = Config(
                routes=(
                    Route(prefix="/finish/", upstream=upstream.url + "/v1/",
                          on_disconnect="finish"),
                    Route(prefix="/cancel/", upstream=upstream.url + "/v1/",
                          on_disconnect="cancel"),
                ),
                server=ServerConfig(bind="127.0.0.1:0"),
                journal=JournalConfig(url=journal),
            )
            async with run_keepstream(config) as ks:
                view.say(f"fake LLM upstream on {upstream.url}; keepstream on {ks.url}")
                view.say(f"journal: {journal}")
                spec = FakeResponseSpec(events=_EVENTS, interval=_INTERVAL, style="llm",
                                        event_size=48)
                expected = spec.expected_body()
                view.say()
                view.say("1. a client reads a completion to the end (route /finish/)")
                a = await _client(view, ks.url + "/finish/chat", spec, None)
                view.say()
                view.say("2. a client leaves mid-stream on the 'finish' route")
                b = await _client(view, ks.url + "/finish/chat", spec, 8)
                view.say("   keepstream keeps reading the upstream into the journal ...")
                rec_b = await ks.wait_terminal(b)
                view.say(f"   record {rec_b['status']}, {rec_b['bytes']} bytes, "
                         f"client_gone_at {rec_b['client_gone_at']}")
                view.say()
                view.say("3. a client leaves mid-stream on the 'cancel' route")
                c = await _client(view, ks.url + "/cancel/chat", spec, 8)
                rec_c = await ks.wait_terminal(c)
                view.say(f"   record {rec_c['status']}: upstream closed, "
                         f"{rec_c['bytes']} bytes kept")
                rec_a = await ks.wait_terminal(a)
                checks = [
                    ("1 completed, body byte-identical to the upstream's",
                     rec_a["status"] == "completed" and await ks.body(a) == expected),
                    ("2 completed after the client left, full body journaled",
                     rec_b["status"] == "completed" and rec_b["client_gone_at"] is not None
                     and await ks.body(b) == expected),
                    ("3 cancelled, journal a byte-exact prefix of the upstream's body",
                     rec_c["status"] == "cancelled"
                     and expected.startswith(body_c := await ks.body(c))
                     and 0 < len(body_c) < len(expected)),
                ]
                rows = await ks.proxy.supervisor.writer.list_records(None, 10)
            nursery.cancel_scope.cancel()
        from ._record import record_json

        view.say()
        view.say("the journal (keepstream streams list):")
        view.say(format_table([record_json(r) for r in rows]))
        view.say()
        for text, passed in checks:
            view.say(f"   [{'ok' if passed else 'FAILED'}] {text}")
            ok = ok and passed
    return ok


def run_demo(live: bool = True) -> int:
    return 0 if trio.run(_demo, live) else 1
