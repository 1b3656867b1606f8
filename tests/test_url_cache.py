"""``Supervisor.upstream_url``: the upstream URL of a request, checked by ``build_upstream_url``
and parsed by httpx once per distinct URL; the cache is bounded and never changes an answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from keepstream import Config, JournalConfig, Route, open_proxy
from keepstream._rules import RequestRejected, build_upstream_url
from keepstream._supervisor import URL_CACHE_MAX_KEY, URL_CACHE_SIZE, Supervisor

ROUTES = (Route(prefix="/v1/", upstream="http://a.invalid:8001/api"),
          Route(prefix="/", upstream="http://b.invalid:8002"))


class Seen(httpx.AsyncBaseTransport):
    """An upstream that records each request's URL and answers one event."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield b"data: x\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Body())


def _sup(proxy: object) -> Supervisor:
    sup: Supervisor = proxy.supervisor  # type: ignore[attr-defined]
    return sup


async def test_the_same_request_gets_the_same_parsed_url() -> None:
    async with open_proxy(Config(routes=ROUTES, journal=JournalConfig(url="memory:"))) as proxy:
        sup = _sup(proxy)
        cases = [(ROUTES[0], "/v1/chat", b""), (ROUTES[0], "/v1/chat", b"a=1"),
                 (ROUTES[1], "/v1/chat", b""), (ROUTES[1], "/x%20y", b"q=%2F")]
        for route, path, query in cases:
            first = sup.upstream_url(route, path, query)
            assert isinstance(first, httpx.URL)
            assert first == httpx.URL(build_upstream_url(route.upstream, route.prefix, path,
                                                         query))
            assert sup.upstream_url(route, path, query) is first  # kept, not parsed again
        # The key is the whole request: same path, other route or query, other URL.
        assert str(sup.upstream_url(ROUTES[0], "/v1/chat", b"")) == \
            "http://a.invalid:8001/api/chat"
        assert str(sup.upstream_url(ROUTES[1], "/v1/chat", b"")) == \
            "http://b.invalid:8002/v1/chat"
        assert str(sup.upstream_url(ROUTES[0], "/v1/chat", b"a=1")) == \
            "http://a.invalid:8001/api/chat?a=1"


async def test_a_refused_url_is_refused_every_time_and_never_kept() -> None:
    async with open_proxy(Config(routes=ROUTES, journal=JournalConfig(url="memory:"))) as proxy:
        sup = _sup(proxy)
        for _ in range(2):
            with pytest.raises(RequestRejected) as info:
                sup.upstream_url(ROUTES[1], "/x", b"a b")
            assert info.value.status == 400
        assert not sup._urls


async def test_the_cache_is_bounded_and_long_urls_are_not_kept() -> None:
    async with open_proxy(Config(routes=ROUTES, journal=JournalConfig(url="memory:"))) as proxy:
        sup = _sup(proxy)
        for i in range(URL_CACHE_SIZE + 50):
            sup.upstream_url(ROUTES[1], f"/p{i}", b"")
        assert len(sup._urls) == URL_CACHE_SIZE
        assert (ROUTES[1].upstream, "/", "/p0", b"") not in sup._urls  # the oldest went
        long_query = b"q=" + b"x" * URL_CACHE_MAX_KEY
        url = sup.upstream_url(ROUTES[1], "/long", long_query)
        assert str(url).endswith("?" + long_query.decode())
        assert (ROUTES[1].upstream, "/", "/long", long_query) not in sup._urls


async def test_streams_through_the_cache_reach_their_own_urls() -> None:
    seen = Seen()
    config = Config(routes=ROUTES, journal=JournalConfig(url="memory:"))
    async with httpx.AsyncClient(transport=seen) as http, \
            open_proxy(config, client=http) as proxy:
        with trio.fail_after(10):
            for path in ["/v1/chat", "/v1/chat", "/other?x=1", "/v1/chat?x=2", "/other?x=1"]:
                async with proxy.open_stream("GET", path) as handle:
                    assert handle.status_code == 200
                    assert b"".join([chunk async for chunk in handle]) == b"data: x\n\n"
    assert seen.urls == ["http://a.invalid:8001/api/chat", "http://a.invalid:8001/api/chat",
                         "http://b.invalid:8002/other?x=1", "http://a.invalid:8001/api/chat?x=2",
                         "http://b.invalid:8002/other?x=1"]
