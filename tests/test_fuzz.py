"""Fuzzing the sans-IO layer: the SSE parser and the request, header and URL rules (invariants
I6, I8, I9; FAULTS rows 15 and 16).

Each target has one ``check_*`` function that runs it on one input and asserts its contract;
three things call them:

* hypothesis properties (``test_property_*``), CI-sized;
* a seeded loop of 100,000 generated inputs per target (``test_random_inputs``): random bytes
  and random sequences of hostile pieces, so that the run is the same every time;
* the coverage-guided atheris harnesses in ``fuzz/`` (see ``fuzz/README.md``).

The contracts:

* ``SSEParser``: any bytes in any chunking give the same events, ``last_id``, count, overflow
  state and offset as one feed; nothing raises; what it buffers stays under
  ``max_line_bytes + max_event_bytes``. ``count()`` (the proxy's hot path) over the same
  chunks reports what ``feed()`` does after every chunk (``check_sse_count``).
* ``normalize_path`` + ``match_route`` + ``build_upstream_url``: only ``RequestRejected``
  (400; 502 for a bad upstream); a URL that comes out has exactly the upstream's scheme and
  authority, starts with its base path, has no fragment, and its path passes ``normalize_path``;
  ``normalize_path`` returns the raw path unchanged. ``parse_upstream`` raises only
  ``ValueError``.
* ``filter_request_headers`` / ``filter_response_headers``: never a hop-by-hop header or one
  named in a ``Connection`` header (nor ``Host``/``Content-Length`` upstream); every other
  header kept, lowercased, in order, duplicates included.
* ``check_request``: only ``RequestRejected`` (400, 405, 501); whatever it accepts has one
  consistent framing, an origin-form target and no NUL/CR/LF in a header.

What the fuzzers found is pinned in the regression tests at the end of this file.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepstream._rules import (
    HOP_BY_HOP,
    RequestRejected,
    build_upstream_url,
    check_request,
    filter_request_headers,
    filter_response_headers,
    match_route,
    normalize_path,
    parse_upstream,
)
from keepstream._sse import Comment, Event, SSEParser

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")


def attempt(fn: Callable[..., T], *args: object) -> T | RequestRejected:
    """``fn(*args)``, or the ``RequestRejected`` it raised (anything else propagates)."""
    try:
        return fn(*args)
    except RequestRejected as exc:
        return exc

# -- SSEParser ---------------------------------------------------------------------------------

SSE_CAPS: tuple[tuple[int, int], ...] = ((1 << 20, 8 << 20), (8, 16), (1, 1), (64, 32))


def _parse(chunks: Sequence[bytes], max_line: int, max_event: int) -> tuple[object, ...]:
    parser = SSEParser(max_line_bytes=max_line, max_event_bytes=max_event)
    items: list[Event | Comment] = []
    for piece in chunks:
        items += parser.feed(piece)
        assert parser.buffered <= max_line + max_event, (parser.buffered, max_line, max_event)
    items += parser.close()
    return items, parser.last_id, parser.events, parser.overflowed, parser.offset


def check_sse(data: bytes, cuts: Sequence[int], max_line: int = 1 << 20,
              max_event: int = 8 << 20) -> None:
    """Feeding ``data`` whole and split at ``cuts`` gives the same result."""
    whole = _parse([data], max_line, max_event)
    bounds = sorted({0, len(data), *(min(max(c, 0), len(data)) for c in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert _parse(chunks, max_line, max_event) == whole, (data, cuts, max_line, max_event)
    items = whole[0]
    assert isinstance(items, list)
    ends = [item.end for item in items]
    assert ends == sorted(ends) and all(0 < e <= len(data) for e in ends)
    assert whole[4] == len(data)
    check_sse_count(chunks, max_line, max_event)


def check_sse_count(chunks: Sequence[bytes], max_line: int, max_event: int) -> None:
    """``count()`` (the proxy's hot path) over ``chunks`` reports, after every chunk, what
    ``feed()`` over the same chunks does: the events it completed, ``events``, ``last_id``,
    ``dispatched_id``, ``boundary``, ``overflowed`` and ``offset``; its buffer stays bounded."""
    fed = SSEParser(max_line_bytes=max_line, max_event_bytes=max_event)
    counted = SSEParser(max_line_bytes=max_line, max_event_bytes=max_event)
    for piece in chunks:
        items = fed.feed(piece)
        n = counted.count(piece)
        assert n == sum(1 for item in items if isinstance(item, Event)), (chunks, piece)
        assert (counted.events, counted.last_id, counted.dispatched_id, counted.boundary,
                counted.overflowed, counted.offset) == (
                    fed.events, fed.last_id, fed.dispatched_id, fed.boundary, fed.overflowed,
                    fed.offset), (chunks, piece)
        assert counted.buffered <= max_line + max_event, (counted.buffered, max_line, max_event)


# -- paths and URLs ----------------------------------------------------------------------------

UPSTREAMS = ("http://h:9", "http://h:9/", "http://h:9/api/", "https://10.1.2.3/a/b",
             "http://[::1]:1/x", "http://u.example:8080/v1")
PREFIXES = ("/", "/v1/", "/v1", "/plain", "/a/b/")


def check_url(raw_path: bytes, upstream: str, prefix: str, query: bytes) -> None:
    """A raw path through the app's steps: normalize, route (one prefix), build."""
    safe = attempt(normalize_path, raw_path)
    if isinstance(safe, RequestRejected):
        assert safe.status == 400
        return
    assert safe.encode("ascii") == raw_path  # checked, never rewritten
    if match_route([prefix], safe) is None:
        return
    scheme, authority, base = parse_upstream(upstream)
    url = attempt(build_upstream_url, upstream, prefix, safe, query)
    if isinstance(url, RequestRejected):
        assert url.status == 400
        return
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == (scheme, authority), url
    assert url.startswith(f"{scheme}://{authority}{base.rstrip('/')}"), url
    assert parts.fragment == "" and "#" not in url
    normalize_path(parts.path.encode("ascii"))
    assert parts.query == query.decode("ascii")


def check_upstream(url: str) -> None:
    """``parse_upstream`` on any string: only ValueError; what passes keeps requests on it."""
    try:
        scheme, authority, _ = parse_upstream(url)
    except ValueError:
        return
    for path in ("/", "/x", "/x/y"):
        built = urlsplit(build_upstream_url(url, "/", path, b"q=1"))
        assert (built.scheme, built.netloc) == (scheme, authority), (url, built)


# -- headers -----------------------------------------------------------------------------------


def _connection_named(headers: Headers) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip(b" \t").lower() for t in value.split(b",")}
    return named - {b""}


def check_headers(headers: Headers) -> None:
    named = _connection_named(headers)
    for fn, never in ((filter_request_headers, HOP_BY_HOP | {b"host", b"content-length"}),
                      (filter_response_headers, HOP_BY_HOP | {b"content-length"})):
        out = fn(iter(headers))
        names = {n for n, _ in out}
        assert not names & never, (fn.__name__, names & never)
        assert not names & named, (fn.__name__, names & named)
        kept = [(n.lower(), v) for n, v in headers
                if n.lower() not in never and n.lower() not in named]
        assert out == kept, fn.__name__


# -- check_request -----------------------------------------------------------------------------


def check_request_contract(method: str, target: bytes, headers: Headers) -> None:
    refused = attempt(check_request, method, target, headers)
    if isinstance(refused, RequestRejected):
        assert refused.status in (400, 405, 501) and refused.message, refused
        return
    assert method.upper() != "CONNECT"
    assert target.startswith(b"/") and not target.startswith(b"//")
    lengths = [p.strip(b" \t") for n, v in headers if n.lower() == b"content-length"
               for p in v.split(b",")]
    encodings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
    assert not (lengths and encodings)
    assert all(p.isdigit() for p in lengths)
    assert len({p.lstrip(b"0") for p in lengths}) <= 1
    assert len(encodings) <= 1
    for name, value in headers:
        assert not {0, 10, 13} & set(name + value)


# -- hypothesis --------------------------------------------------------------------------------

PIECES = [
    b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%5c", b"%25", b"%00", b"%0d%0a", b"%",
    b"%g", b"\\", b"@", b":", b";", b"?", b"#", b" ", b"\t", b"\x00", b"\r\n", b"\xff",
    b"\xc3\xa9", b"\xef\xbc\x8e", b"a", b"v1", b"plain", b"evil.com", b"http:", b"//evil",
    b"~", b"*", b"[::1]", b"1",
]
SSE_PIECES = [
    b"data:", b"data: ", b"event:", b"id:", b"id: ", b"retry:", b"retry: ", b":", b"\n", b"\r",
    b"\r\n", b"\n\n", b"\xef\xbb\xbf", b"\x00", b"\xe2\x82", b"\xc3\xa9", b"x", b"12", b" ",
    b"9" * 25, b"a" * 40,
]
HEADER_NAMES = [
    b"Connection", b"connection", b"CONNECTION", b"Keep-Alive", b"TE", b"Trailer",
    b"Transfer-Encoding", b"Upgrade", b"Proxy-Connection", b"Proxy-Authorization",
    b"Proxy-Authenticate", b"Host", b"Content-Length", b"X-Secret", b"x-secret", b"Accept",
    b"Authorization", b"", b"x y", b"X-\xff",
]
HEADER_VALUES = [
    b"close", b"keep-alive", b"close, X-Secret", b" X-Secret ,, accept\t", b"Host",
    b"Content-Length", b"te, trailer", b"chunked", b" Chunked ", b"gzip, chunked", b"5",
    b"5, 5", b"5, 6", b"+5", b"-1", b"0x10", b"", b"a\x00b", b"a\rb", b"a\nb", b"\xff",
    b"1" * 30, b"0" * 30 + b"5",
]


def _joined(pieces: list[bytes], lead: bytes = b"") -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(pieces), max_size=16).map(lambda ps: lead + b"".join(ps))


_PATHS = st.one_of(st.binary(max_size=48), _joined(PIECES), _joined(PIECES, b"/"),
                   _joined(PIECES, b"/v1/"))
_HEADERS = st.lists(
    st.tuples(st.one_of(st.sampled_from(HEADER_NAMES), st.binary(max_size=8)),
              st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=12))),
    max_size=10,
)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), _joined(SSE_PIECES)),
       cuts=st.lists(st.integers(0, 200), max_size=12), caps=st.sampled_from(SSE_CAPS))
def test_property_sse_any_bytes_any_chunking(
    data: bytes, cuts: list[int], caps: tuple[int, int]
) -> None:
    check_sse(data, cuts, *caps)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=1, max_size=120), caps=st.sampled_from(SSE_CAPS))
def test_property_sse_one_byte_feeds(data: bytes, caps: tuple[int, int]) -> None:
    check_sse(data, list(range(len(data))), *caps)


@settings(max_examples=600, deadline=None)
@given(raw=_PATHS, upstream=st.sampled_from(UPSTREAMS), prefix=st.sampled_from(PREFIXES),
       query=st.one_of(st.binary(max_size=16), _joined(PIECES)))
def test_property_url_stays_on_the_upstream(
    raw: bytes, upstream: str, prefix: str, query: bytes
) -> None:
    check_url(raw, upstream, prefix, query)


@settings(max_examples=300, deadline=None)
@given(url=st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:/", ""]),
              st.text(alphabet="h:9@[]/.%2e5c#?\\ \t\x00é", max_size=20)).map("".join),
))
def test_property_parse_upstream_only_value_error(url: str) -> None:
    check_upstream(url)


@settings(max_examples=500, deadline=None)
@given(headers=_HEADERS)
def test_property_header_filters(headers: Headers) -> None:
    check_headers(headers)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "CONNECT", "connect", "OPTIONS", "", "G\x00T"]),
       target=_PATHS, headers=_HEADERS)
def test_property_check_request_only_rejects(method: str, target: bytes, headers: Headers
                                              ) -> None:
    check_request_contract(method, target, headers)


# -- 100,000 seeded random inputs per target ---------------------------------------------------

N = 100_000


def _blob(rng: random.Random, pieces: list[bytes], lead: bytes = b"") -> bytes:
    """Random bytes half the time, else random pieces (each sometimes a random byte)."""
    if rng.random() < 0.5:
        return lead + rng.randbytes(rng.randrange(48))
    out = [lead]
    out.extend(rng.choice(pieces) if rng.random() < 0.9 else rng.randbytes(1)
               for _ in range(rng.randrange(16)))
    return b"".join(out)


def _run_sse(rng: random.Random) -> None:
    data = _blob(rng, SSE_PIECES)
    cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(6))]
    if rng.random() < 0.05:
        cuts = list(range(len(data)))
    check_sse(data, cuts, *rng.choice(SSE_CAPS))


def _run_url(rng: random.Random) -> None:
    lead = rng.choice([b"", b"/", b"/v1/", b"/plain", b"/a/b/"])
    check_url(_blob(rng, PIECES, lead), rng.choice(UPSTREAMS), rng.choice(PREFIXES),
              _blob(rng, PIECES) if rng.random() < 0.3 else b"")
    if rng.random() < 0.05:
        check_upstream(rng.choice(["http://", "https://", ""])
                       + _blob(rng, PIECES).decode("latin-1"))


def _random_headers(rng: random.Random) -> Headers:
    headers = []
    for _ in range(rng.randrange(8)):
        name = rng.choice(HEADER_NAMES) if rng.random() < 0.8 else rng.randbytes(
            rng.randrange(6))
        value = rng.choice(HEADER_VALUES) if rng.random() < 0.7 else _blob(rng, HEADER_VALUES)
        headers.append((name, value))
    return headers


def _run_headers(rng: random.Random) -> None:
    check_headers(_random_headers(rng))


def _run_check_request(rng: random.Random) -> None:
    method = rng.choice(["GET", "POST", "CONNECT", "Connect", "PUT", ""])
    check_request_contract(method, _blob(rng, PIECES, rng.choice([b"", b"/"])),
                           _random_headers(rng))


TARGETS: dict[str, Callable[[random.Random], None]] = {
    "sse": _run_sse,
    "url": _run_url,
    "headers": _run_headers,
    "check_request": _run_check_request,
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_random_inputs(target: str) -> None:
    """100,000 seeded inputs; the first failing one is reported with its index and seed."""
    seed = 0x6B73 + list(TARGETS).index(target)
    rng = random.Random(seed)
    run = TARGETS[target]
    start = time.perf_counter()
    for i in range(N):
        state = rng.getstate()
        try:
            run(rng)
        except Exception as exc:
            rng.setstate(state)
            raise AssertionError(f"{target}: input {i} (seed {seed}) failed: {exc!r}") from exc
    print(f"\n{target}: {N} inputs in {time.perf_counter() - start:.1f} s")


# -- regressions found by fuzzing --------------------------------------------------------------


def test_regression_sse_retry_with_thousands_of_digits() -> None:
    """An upstream line ``retry: <5000 digits>`` made ``int()`` raise ValueError (Python's
    4300-digit limit) inside the stream task, which ended the whole process. A value that does
    not fit is ignored, as browsers do."""
    for digits in (19, 4301, 5000):
        stream = b"retry: " + b"9" * digits + b"\ndata: x\n\n"
        check_sse(stream, [7, 100])
        (event,) = SSEParser().feed(stream)
        assert isinstance(event, Event) and event.data == "x" and event.retry is None
    (event,) = SSEParser().feed(b"retry: " + b"9" * 18 + b"\ndata: x\n\n")
    assert isinstance(event, Event) and event.retry == 10**18 - 1


def test_regression_check_request_content_length_with_thousands_of_digits() -> None:
    """``int()`` on a 5000-digit Content-Length raised ValueError out of check_request (h11
    refuses such a length first over HTTP/1.1, but the rule must hold on its own)."""
    long = b"1" * 5000
    check_request_contract("POST", b"/x", [(b"content-length", long)])
    check_request_contract("POST", b"/x", [(b"content-length", long), (b"content-length",
                                                                        b"0" + long)])
    with pytest.raises(RequestRejected) as info:
        check_request("POST", b"/x", [(b"content-length", long), (b"content-length",
                                                                   long + b"2")])
    assert info.value.status == 400
