"""keepstream's linear connection pool makes exactly the decisions of httpcore's own
``_assign_requests_to_connections`` (hypothesis over random pools: closed, expired, idle, busy
connections of several origins, queued and assigned requests, limits), and is the pool the
upstream client really uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from keepstream import Config, Route
from keepstream._pool import SUPPORTED, LinearConnectionPool
from keepstream._proxy import make_client

ORIGINS = [httpcore.URL(f"http://h{i}:80/").origin for i in range(3)]


@dataclass(eq=False)
class FakeConn:
    origin: Any
    closed: bool = False
    expired: bool = False
    idle: bool = False
    available: bool = False
    name: str = ""

    def is_closed(self) -> bool:
        return self.closed

    def has_expired(self) -> bool:
        return self.expired

    def is_idle(self) -> bool:
        return self.idle

    def is_available(self) -> bool:
        return self.available

    def can_handle_request(self, origin: Any) -> bool:
        return bool(origin == self.origin)


@dataclass(eq=False)
class FakeRequest:
    url: Any


@dataclass(eq=False)
class FakePoolRequest:
    request: FakeRequest
    connection: Any = None
    assigned: list[str] = field(default_factory=list)

    def is_queued(self) -> bool:
        return self.connection is None

    def assign_to_connection(self, connection: Any) -> None:
        self.connection = connection


conn_st = st.tuples(st.integers(0, 2), st.booleans(), st.booleans(), st.booleans(),
                    st.booleans())
req_st = st.tuples(st.integers(0, 2), st.booleans())


def _run(cls: type, conns: list[tuple[int, bool, bool, bool, bool]],
         reqs: list[tuple[int, bool]], max_conn: int, max_keep: int) -> Any:
    pool = cls(max_connections=max_conn, max_keepalive_connections=max_keep)
    made = 0
    connections = []
    for i, (o, closed, expired, idle, avail) in enumerate(conns):
        connections.append(FakeConn(ORIGINS[o], closed, expired, idle, idle or avail, f"c{i}"))

    def create_connection(origin: Any) -> FakeConn:
        nonlocal made
        made += 1
        return FakeConn(origin, name=f"new{made}")

    pool.create_connection = create_connection
    pool._connections = connections
    requests = []
    for o, already in reqs:
        pr = FakePoolRequest(FakeRequest(httpcore.URL(f"http://h{o}:80/x")))
        if already and connections:
            pr.connection = connections[0]
        requests.append(pr)
    pool._requests = requests
    closing = pool._assign_requests_to_connections()
    return ([c.name for c in closing], [c.name for c in pool._connections],
            [None if r.connection is None else r.connection.name for r in requests])


@settings(max_examples=3000, deadline=None)
@given(st.lists(conn_st, max_size=12), st.lists(req_st, max_size=12), st.integers(1, 14),
       st.integers(0, 14))
def test_same_decisions_as_httpcore(conns: list[tuple[int, bool, bool, bool, bool]],
                                    reqs: list[tuple[int, bool]], max_conn: int,
                                    max_keep: int) -> None:
    assert SUPPORTED
    theirs = _run(httpcore.AsyncConnectionPool, conns, reqs, max_conn, max_keep)
    ours = _run(LinearConnectionPool, conns, reqs, max_conn, max_keep)
    assert ours == theirs


def test_the_upstream_client_uses_it() -> None:
    client = make_client(Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:9/"),)))
    # http:// goes through FastTransport; its fallback (https://) is httpx's, with this pool.
    fallback = client._transport._fallback  # type: ignore[attr-defined]
    assert type(fallback._pool) is LinearConnectionPool


def test_only_keepstreams_own_client_has_its_transport_used_directly() -> None:
    """The stream task skips the client's send layers only for ``make_client``'s clients:
    an embedder's client (hooks, auth, cookies of its own) always goes through ``send``."""
    from keepstream._proxy import own_transport_of
    from keepstream._transport import FastTransport

    client = make_client(Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:9/"),)))
    own = own_transport_of(client)
    assert isinstance(own, FastTransport)
    assert own is client._transport
    assert own_transport_of(httpx.AsyncClient(transport=own)) is None
