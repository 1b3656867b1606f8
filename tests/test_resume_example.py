from __future__ import annotations

from pathlib import Path

import trio
from examples.resume_client import run

from keepstream.testing import FakeUpstream


async def test_resume_example(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    with trio.fail_after(30):
        out = await run(fake_upstream, f"sqlite:///{tmp_path / 'r.db'}")
    events = out["events"]
    assert isinstance(events, list)
    assert len(events) == out["expected_events"]
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)  # no duplicate after the reconnect
    assert out["final_status"] == 204
    assert out["detached_body"] == out["expected_body"]
    # One upstream request for the resumed stream, one for the detached job.
    assert out["upstream_requests"] == 2
