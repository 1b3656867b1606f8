"""Resume and detached streams, end to end, as a browser's EventSource would do them.

Run: ``python examples/resume_client.py`` (starts a fake LLM upstream and keepstream with a
resumable route on loopback). It reads five events, loses the connection, reconnects with
``Last-Event-ID`` and gets the rest from keepstream's journal without a second upstream request;
then it starts a detached job (``Prefer: respond-async``) and fetches its body later.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import trio

from keepstream import Config, JournalConfig, Route, ServerConfig
from keepstream.testing import FakeResponseSpec, FakeUpstream, run_fake_upstream, run_keepstream


def parse_events(raw: bytes) -> list[dict[str, str]]:
    """A minimal SSE reader for the example (keepstream's own parser is keepstream._sse)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "data", "event"):
                fields[name] = value
        if "data" in fields:
            events.append(fields)
    return events


async def read_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], stop_after: int | None
) -> tuple[list[dict[str, str]], int]:
    """Read SSE events; drop the connection after ``stop_after`` (like a tab going to sleep)."""
    got: list[dict[str, str]] = []
    buf = b""
    async with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 204:
            return got, 204
        # Leaving early by cancelling a scope lets the cancellation run through httpx's
        # generators, so each one finishes cleanly (a bare `return` would leave them pending).
        with trio.CancelScope() as scope:
            async for chunk in resp.aiter_raw():
                buf += chunk
                while b"\n\n" in buf and not scope.cancel_called:
                    block, buf = buf.split(b"\n\n", 1)
                    got += parse_events(block + b"\n\n")
                    if stop_after is not None and len(got) >= stop_after:
                        scope.cancel()
    return got, resp.status_code


async def run(upstream: FakeUpstream, journal_url: str) -> dict[str, object]:
    config = Config(
        routes=(Route(prefix="/v1/", upstream=upstream.url + "/", resumable=True),),
        server=ServerConfig(bind="127.0.0.1:0", drain_timeout=2.0),
        journal=JournalConfig(url=journal_url),
    )
    spec = FakeResponseSpec(events=12, interval=0.02, style="llm")
    async with run_keepstream(config) as ks, httpx.AsyncClient(trust_env=False) as client:
        url = ks.url + "/v1/chat"
        first, _ = await read_events(client, url, dict(spec.headers()), stop_after=5)
        print(f"read {len(first)} events, connection lost; last id {first[-1]['id']}")
        rest, status = await read_events(
            client, url, {"Last-Event-ID": first[-1]["id"]}, stop_after=None)
        print(f"reconnected (HTTP {status}): {len(rest)} more events from the journal")
        _, status = await read_events(
            client, url, {"Last-Event-ID": rest[-1]["id"]}, stop_after=None)
        print(f"reconnect after the end: HTTP {status} (EventSource stops)")

        resp = await client.post(ks.url + "/v1/job", content=b"{}",
                                  headers={**dict(spec.headers()), "Prefer": "respond-async"})
        record = json.loads(resp.content)
        print(f"detached: HTTP {resp.status_code}, Location {resp.headers['location']}")
        body = await client.get(ks.url + resp.headers["location"] + "/body")
        print(f"body endpoint: {len(body.content)} bytes; record "
              f"{(await ks.wait_terminal(record['id']))['status']}")
        return {
            "events": first + rest,
            "upstream_requests": len(upstream.exchanges),
            "final_status": status,
            "detached_body": body.content,
            "expected_body": spec.expected_body(),
            "expected_events": spec.events + 1,  # the llm style ends with data: [DONE]
        }


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            upstream: FakeUpstream = await nursery.start(run_fake_upstream)
            await run(upstream, f"sqlite:///{Path(tmp) / 'resume.db'}")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
