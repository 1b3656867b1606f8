"""Tests of the canary listener (``keepstream.testing.run_canary`` and the ``canary`` fixture)."""

from __future__ import annotations

import trio

from keepstream.testing import Canary, chaos_request, run_canary


async def test_the_fixture_counts_every_connection(canary: Canary) -> None:
    assert canary.connections == 0
    assert canary.listen == f"127.0.0.1:{canary.port}"
    assert canary.url == f"http://127.0.0.1:{canary.port}"
    with trio.fail_after(5):
        for n in (1, 2, 3):
            res = await chaos_request(canary.port, "GET", "/stolen")
            # Closed at once, without an answer: a proxy that got here learns nothing.
            assert res.status is None and res.closed_by_peer, res
            assert canary.connections == n


async def test_run_canary_in_a_nursery_stops_with_it() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            found: Canary = await nursery.start(run_canary)
            stream = await trio.open_tcp_stream("127.0.0.1", found.port)
            assert await stream.receive_some(10) == b""  # counted, then closed
            await stream.aclose()
            assert found.connections == 1
            nursery.cancel_scope.cancel()
        res = await chaos_request(found.port)
    assert res.error is not None and res.error.startswith("connect: ConnectionRefusedError")
    assert found.connections == 1
