"""A linear-time connection pool for httpx's default transport.

httpcore 1.0's ``AsyncConnectionPool._assign_requests_to_connections`` runs on every request
added to or removed from the pool, and for every queued request it scans every connection: with
a few hundred kept-alive upstream connections and a burst of new streams that is
O(requests x connections) per call, O(n^3) per burst. Measured in keepstream's paced benchmark
(200 streams started at once on a pool holding the previous burst's 200 idle connections): the
median time to first byte went from 0.6 s to 12 s and the CPU per event doubled. This subclass
makes the same decisions in one pass over the connections plus one over the queued requests
(encode/httpcore#1035 fixes the same upstream; drop this once a fixed release is required).

It is only installed on httpcore 1.0.x, whose private pool attributes it relies on
(:func:`install`); on any other version httpx's own pool is kept.
"""

from __future__ import annotations

from typing import Any

import httpcore

SUPPORTED = httpcore.__version__.startswith("1.0.")


class LinearConnectionPool(httpcore.AsyncConnectionPool):
    """``httpcore.AsyncConnectionPool`` with a linear ``_assign_requests_to_connections``."""

    def _assign_requests_to_connections(self) -> list[Any]:
        closing: list[Any] = []
        # 1. Drop closed, expired and surplus idle connections. As upstream, the surplus test
        #    compares the number of connections still in the pool (not only the idle ones)
        #    with max_keepalive_connections.
        kept: list[Any] = []
        left = len(self._connections)
        for conn in self._connections:
            if conn.is_closed():
                left -= 1
            elif conn.has_expired() or (
                conn.is_idle() and left > self._max_keepalive_connections
            ):
                left -= 1
                closing.append(conn)
            else:
                kept.append(conn)
        self._connections[:] = kept

        # 2. Assign queued requests. Within one pass no connection becomes available (a new
        #    HTTP/1.1 connection is not available until it connects), so the first available
        #    connection for an origin is found once and reused, as upstream's per-request scan
        #    would find it.
        queued = [r for r in self._requests if r.is_queued()]
        if not queued:
            return closing
        first: dict[Any, Any] = {}
        idle: list[Any] | None = None
        next_idle = 0
        for pool_request in queued:
            origin = pool_request.request.url.origin
            key = (origin.scheme, origin.host, origin.port)  # httpcore's Origin is unhashable
            if key not in first:
                first[key] = next(
                    (c for c in self._connections
                     if c.can_handle_request(origin) and c.is_available()),
                    None,
                )
            conn = first[key]
            if conn is not None:
                pool_request.assign_to_connection(conn)
            elif len(self._connections) < self._max_connections:
                conn = self.create_connection(origin)
                self._connections.append(conn)
                pool_request.assign_to_connection(conn)
            else:
                if idle is None:
                    idle = [c for c in self._connections if c.is_idle()]
                if next_idle < len(idle):
                    victim = idle[next_idle]
                    next_idle += 1
                    self._connections.remove(victim)
                    closing.append(victim)
                    for key in [k for k, v in first.items() if v is victim]:
                        del first[key]
                    conn = self.create_connection(origin)
                    self._connections.append(conn)
                    pool_request.assign_to_connection(conn)
        return closing


def install(transport: Any) -> bool:
    """Swap the pool of an ``httpx.AsyncHTTPTransport`` for :class:`LinearConnectionPool`
    (same state, one method different). Returns whether it was installed."""
    pool = getattr(transport, "_pool", None)
    if not SUPPORTED or type(pool) is not httpcore.AsyncConnectionPool:
        return False
    pool.__class__ = LinearConnectionPool
    return True
