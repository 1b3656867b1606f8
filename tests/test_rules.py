"""Tests of the request, header and URL rules (invariant I9: never an open proxy).

Rules: plain synchronous tests, no I/O. ``forward()`` below runs a request target through
the same steps the app runs (check, normalize, route, build); the SSRF corpus and the
hypothesis properties go through it, so they test the composition, not each piece alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
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

UPSTREAM = "http://10.0.0.5:9000/api/"
ROUTES = [("/v1/", UPSTREAM), ("/plain", "https://backend.internal"), ("/", "http://h:9")]
PREFIXES = [p for p, _ in ROUTES]


def forward(target: bytes, method: str = "GET") -> str:
    """The upstream URL for a request target, or RequestRejected (404 when no route)."""
    check_request(method, target, [(b"host", b"proxy")])
    raw_path, _, query = target.partition(b"?")
    safe = normalize_path(raw_path)
    idx = match_route(PREFIXES, safe)
    if idx is None:
        raise RequestRejected(404, "no route")
    prefix, upstream = ROUTES[idx]
    return build_upstream_url(upstream, prefix, safe, query)


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


ORIGINS = {origin(u) for _, u in ROUTES}


# --- headers ----------------------------------------------------------------------------------


def test_hop_by_hop_set() -> None:
    assert (
        frozenset(
            {
                b"connection",
                b"keep-alive",
                b"proxy-connection",
                b"proxy-authenticate",
                b"proxy-authorization",
                b"te",
                b"trailer",
                b"transfer-encoding",
                b"upgrade",
            }
        )
        == HOP_BY_HOP
    )


def test_request_headers_drop_connection_named_and_hop_by_hop() -> None:
    headers = [
        (b"Host", b"proxy.example"),
        (b"Connection", b"close, X-Secret"),
        (b"X-Secret", b"s3cret"),
        (b"Authorization", b"Bearer k"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Content-Length", b"5"),
        (b"Accept", b"text/event-stream"),
        (b"X-Dup", b"1"),
        (b"x-dup", b"2"),
    ]
    assert filter_request_headers(headers) == [
        (b"authorization", b"Bearer k"),
        (b"accept", b"text/event-stream"),
        (b"x-dup", b"1"),
        (b"x-dup", b"2"),
    ]


def test_connection_tokens_case_whitespace_and_several_headers() -> None:
    headers = [
        (b"x-a", b"1"),
        (b"connection", b" X-A ,,\tx-B\t"),
        (b"X-B", b"2"),
        (b"CONNECTION", b"x-c"),
        (b"x-c", b"3"),
        (b"x-d", b"4"),
    ]
    assert filter_request_headers(headers) == [(b"x-d", b"4")]
    assert filter_response_headers(headers) == [(b"x-d", b"4")]


def test_connection_named_header_appearing_before_connection_is_dropped() -> None:
    headers = iter([(b"x-secret", b"1"), (b"connection", b"x-secret")])  # any iterable
    assert filter_request_headers(headers) == []


def test_response_headers() -> None:
    headers = [
        (b"Content-Type", b"text/event-stream"),
        (b"Content-Length", b"100"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive, X-Internal"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Internal", b"node-7"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Cache-Control", b"no-cache"),
    ]
    assert filter_response_headers(headers) == [
        (b"content-type", b"text/event-stream"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"cache-control", b"no-cache"),
    ]


# --- check_request ----------------------------------------------------------------------------


def rejected(status: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(RequestRejected) as info:
        check_request(method, target, headers)
    assert info.value.status == status
    assert info.value.message


def test_request_rejected_attributes() -> None:
    exc = RequestRejected(418, "teapot")
    assert (exc.status, exc.message) == (418, "teapot")
    assert "418" in str(exc)


@pytest.mark.parametrize("method", ["CONNECT", "connect"])
def test_connect_is_405(method: str) -> None:
    rejected(405, method, b"evil:443", [])
    rejected(405, method, b"/v1/x", [])


@pytest.mark.parametrize(
    "target", [b"http://evil/", b"https://evil/v1", b"evil:443", b"*", b"", b"v1/x", b"//evil/x"]
)
def test_non_origin_form_targets_are_400(target: bytes) -> None:
    rejected(400, "GET", target, [])
    rejected(400, "OPTIONS", target, [])


def test_valid_requests_pass() -> None:
    check_request("POST", b"/v1/chat?stream=1", [(b"content-length", b"12")])
    check_request("POST", b"/v1/chat", [(b"Content-Length", b"5"), (b"content-length", b"5")])
    check_request("POST", b"/v1/chat", [(b"content-length", b"5, 5")])
    check_request("POST", b"/v1/chat", [(b"Transfer-Encoding", b"chunked")])
    check_request("POST", b"/v1/chat", [(b"transfer-encoding", b" Chunked ")])
    check_request("GET", b"/", [(b"x-empty", b"")])


def test_content_length_and_transfer_encoding_together_is_400() -> None:
    rejected(400, "POST", b"/v1", [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")])
    rejected(400, "POST", b"/v1", [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")])


@pytest.mark.parametrize(
    "values",
    [[b"5", b"6"], [b"5, 6"], [b"abc"], [b""], [b"-1"], [b"+5"], [b"5 5"], [b"0x10"], [b"5", b""]],
)
def test_bad_content_length_is_400(values: list[bytes]) -> None:
    rejected(400, "POST", b"/v1", [(b"content-length", v) for v in values])


@pytest.mark.parametrize(
    "values", [[b"gzip"], [b"gzip, chunked"], [b"chunked, chunked"], [b"chunked", b"chunked"]]
)
def test_transfer_encoding_other_than_chunked_is_501(values: list[bytes]) -> None:
    rejected(501, "POST", b"/v1", [(b"transfer-encoding", v) for v in values])


@pytest.mark.parametrize("bad", [b"a\x00b", b"a\rb", b"a\nb", b"a\r\nX-Injected: 1"])
def test_nul_cr_lf_in_headers_is_400(bad: bytes) -> None:
    rejected(400, "GET", b"/v1", [(b"x-h", bad)])
    rejected(400, "GET", b"/v1", [(b"x-" + bad, b"v")])


# --- normalize_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"/v1/chat/completions",
        b"/v1/caf%C3%A9",  # returned still encoded, never re-encoded
        b"/v1/a%20b",
        b"/v1/a%2eb",  # an encoded dot inside a segment is fine
        b"/v1/.well-known/x",
        b"/v1/...",
        b"/v1/a..b/..c",
        b"/v1/%252e%252e/x",  # double encoding stays literal "%2e%2e" upstream
        b"/v1/x;y=1/z",
        b"/v1/@evil.com",
        b"/v1/user:pass@evil.com/",
        b"/v1/%40evil",
        b"/v1//x",
        b"/v1/a%3Fb%23c",
        b"/v1/-._~!$&'()*+,;=:@",
    ],
)
def test_normalize_path_keeps_safe_paths_unchanged(path: bytes) -> None:
    assert normalize_path(path) == path.decode("ascii")


@pytest.mark.parametrize(
    "path",
    [
        b"v1",
        b"//evil",
        b"/v1/..",
        b"/v1/../x",
        b"/v1/./x",
        b"/v1/.",
        b"/v1/%2e",
        b"/v1/%2e%2e",
        b"/v1/%2E%2e/x",
        b"/v1/.%2e/x",
        b"/v1/%2e./x",
        b"/v1/..;/admin",
        b"/v1/%2e%2e;x=1/admin",
        b"/v1/.;/x",
        b"/v1/%2f",
        b"/v1/%2F",
        b"/v1/a%2fb",
        b"/v1/%5c",
        b"/v1/%5C",
        b"/v1/a\\b",
        b"/v1/%00",
        b"/v1/%0d%0a",
        b"/v1/%09",
        b"/v1/%7f",
        b"/v1/%1F",
        b"/v1/\x00",
        b"/v1/\x7f",
        b"/v1/a b",
        b"/v1/\t",
        b"/v1/\xc3\xa9",
        b"/v1/%",
        b"/v1/%2",
        b"/v1/%zz",
        b"/v1/%u002e",
        b"/v1/x?y",
        b"/v1/x#y",
        b"/v1/<script>",
        b"/v1/{x}",
        b"/v1/a|b",
        b"/v1/`",
    ],
)
def test_normalize_path_rejects(path: bytes) -> None:
    with pytest.raises(RequestRejected) as info:
        normalize_path(path)
    assert info.value.status == 400


# --- match_route ------------------------------------------------------------------------------


def test_match_route() -> None:
    prefixes = ["/", "/v1/", "/v1/chat/", "/plain", "/v1/"]
    assert match_route(prefixes, "/v1/chat/completions") == 2  # longest wins
    assert match_route(prefixes, "/v1/models") == 1  # ties: the first of equal prefixes
    assert match_route(prefixes, "/v1") == 1  # "/v1/" also matches "/v1"
    assert match_route(prefixes, "/v1/chat") == 2
    assert match_route(prefixes, "/v1x") == 0  # only "/" matches
    assert match_route(prefixes, "/plain") == 3
    assert match_route(prefixes, "/plain/x") == 3
    assert match_route(prefixes, "/plainly") == 0  # segment boundary: not "/plain"
    assert match_route(prefixes, "/plain@evil") == 0
    assert match_route(prefixes, "/anything") == 0
    assert match_route(["/v1/", "/plain"], "/other") is None
    assert match_route(["/v1/"], "/v1x") is None
    assert match_route([], "/") is None


# --- build_upstream_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "prefix", "path", "query", "want"),
    [
        ("http://h:9/api/", "/v1/", "/v1/chat", b"", "http://h:9/api/chat"),
        ("http://h:9/api", "/v1/", "/v1/chat", b"", "http://h:9/api/chat"),
        ("http://h:9/api/", "/v1/", "/v1", b"", "http://h:9/api"),
        ("http://h:9/api/", "/v1/", "/v1/", b"", "http://h:9/api/"),
        ("http://h:9", "/v1/", "/v1/chat", b"", "http://h:9/chat"),
        ("http://h:9", "/v1/", "/v1", b"", "http://h:9/"),
        ("http://h:9", "/", "/x/y", b"", "http://h:9/x/y"),
        ("http://h:9", "/", "/", b"", "http://h:9/"),
        ("http://h:9/", "/", "/x", b"", "http://h:9/x"),
        ("http://h:9/base/", "/", "/x", b"", "http://h:9/base/x"),
        ("http://h:9/api", "/v1", "/v1/x", b"", "http://h:9/api/x"),
        ("http://h:9/api/", "/v1", "/v1/x", b"", "http://h:9/api/x"),
        ("http://h:9/api", "/v1", "/v1", b"", "http://h:9/api"),
        ("http://h:9", "/v1", "/v1", b"", "http://h:9/"),
        ("HTTPS://H:9/a/", "/v1/", "/v1/b", b"", "https://H:9/a/b"),
        ("http://h:9/api/", "/v1/", "/v1/c", b"a=1&b=%20&c=http://x/", None),
        ("http://[::1]:8080/", "/", "/x", b"q", "http://[::1]:8080/x?q"),
    ],
)
def test_build_upstream_url(
    upstream: str, prefix: str, path: str, query: bytes, want: str | None
) -> None:
    url = build_upstream_url(upstream, prefix, path, query)
    if want is None:
        want = "http://h:9/api/c?" + query.decode()
    assert url == want


@pytest.mark.parametrize(
    "query", [b"a#b", b"a b", b"a=\x00", b"a=\r\n", b"a\tb", b"a=\x7f", b"a=\xc3\xa9", b"#"]
)
def test_build_upstream_url_rejects_bad_query(query: bytes) -> None:
    with pytest.raises(RequestRejected) as info:
        build_upstream_url("http://h:9", "/", "/x", query)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("upstream", "prefix", "path"),
    [
        ("http://h:9", "/v1", "/v1@evil.com"),  # would make "http://h:9@evil.com"
        ("http://h:9", "/v1", "/v1.evil.com/x"),
        ("http://h:9", "/v1/", "/other"),
        ("http://h:9", "/v1/", "/v1//evil.com/x"),  # "http://h:9//evil.com/x"
        ("http://h:9", "/", "//evil.com/x"),
        ("http://h:9", "/", "/a/../../x"),
        ("http://h:9", "/", "/\\evil"),
        ("http://h:9", "/", "/x#@evil"),
        ("http://h:9", "/", "/é"),
    ],
)
def test_build_upstream_url_refuses_to_leave_the_upstream(
    upstream: str, prefix: str, path: str
) -> None:
    with pytest.raises(RequestRejected) as info:
        build_upstream_url(upstream, prefix, path, b"")
    assert info.value.status == 400


def test_build_upstream_url_with_bad_upstream_is_502() -> None:
    with pytest.raises(RequestRejected) as info:
        build_upstream_url("ftp://h", "/", "/x", b"")
    assert info.value.status == 502


# --- parse_upstream ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://127.0.0.1:9000/v1/", ("http", "127.0.0.1:9000", "/v1/")),
        ("http://127.0.0.1:9000", ("http", "127.0.0.1:9000", "")),
        ("https://api.example.com/", ("https", "api.example.com", "/")),
        ("HTTP://Host:80/a", ("http", "Host:80", "/a")),
        ("http://[::1]:8080/x", ("http", "[::1]:8080", "/x")),
    ],
)
def test_parse_upstream_ok(url: str, want: tuple[str, str, str]) -> None:
    assert parse_upstream(url) == want


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/",
        "file:///etc/passwd",
        "h:9",
        "127.0.0.1:9000",
        "//h/x",
        "/v1",
        "",
        "http://",
        "http:///x",
        "http:h",
        "http:/h",
        "http://u:p@h/",
        "http://u@h/",
        "http://@h/",
        "http://h/?q=1",
        "http://h/?",
        "http://h/#f",
        "http://h/#",
        "http://h:99999/",
        "http://h:abc/",
        "http://h:-1/",
        "http://h /",
        " http://h/",
        "http://h/\n",
        "http://h\\@evil/",
        "http://h/a\\b",
        "http://exämple.com/",
        "http://h/../x",
        "http://h/a/%2e%2e/x",
        "http://h/a%2fb",
        "http://h//x",
    ],
)
def test_parse_upstream_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        parse_upstream(url)


# --- SSRF / path-trick corpus -----------------------------------------------------------------

REJECT = "reject"
KEEP = "keep"  # forwarded, to the route's own origin

CORPUS: list[tuple[bytes, str]] = [
    (b"http://evil/", REJECT),
    (b"http://127.0.0.1:1/", REJECT),
    (b"https://evil.com/v1/chat", REJECT),
    (b"HTTP://EVIL/v1/", REJECT),
    (b"http:/evil/v1/", REJECT),
    (b"evil:443", REJECT),
    (b"evil.com", REJECT),
    (b"*", REJECT),
    (b"//evil/x", REJECT),
    (b"//evil.com:80/v1/chat", REJECT),
    (b"/\\evil.com/x", REJECT),
    (b"\\\\evil\\x", REJECT),
    (b"@evil", REJECT),
    (b"@evil.com/v1/", REJECT),
    (b"/v1/../admin", REJECT),
    (b"/v1/..", REJECT),
    (b"/v1/./../admin", REJECT),
    (b"/v1/%2e%2e/admin", REJECT),
    (b"/v1/%2E%2e/x", REJECT),
    (b"/v1/.%2e/x", REJECT),
    (b"/v1/%2e./x", REJECT),
    (b"/v1/..%2fadmin", REJECT),
    (b"/v1/%2fevil", REJECT),
    (b"/v1/%2F%2Fevil.com", REJECT),
    (b"/v1\\..\\x", REJECT),
    (b"/v1/%5c..%5cx", REJECT),
    (b"/v1/..;/admin", REJECT),
    (b"/v1/%00", REJECT),
    (b"/v1/a%0d%0aX: y", REJECT),
    (b"/v1/a%0d%0aHost:%20evil", REJECT),
    (b"/v1/a\r\nHost: evil", REJECT),
    (b"/v1/x#@evil.com", REJECT),
    (b"/v1/%", REJECT),
    (b"/v1/%%32%65%%32%65/x", REJECT),
    (b"/v1/\xef\xbc\x8e\xef\xbc\x8e/x", REJECT),  # fullwidth dots, raw UTF-8
    (b"/plain@evil.com", KEEP),  # not the "/plain" route (segment match): goes to "/"
    (b"/plain.evil.com/x", KEEP),
    (b"/v1/@evil.com", KEEP),
    (b"/v1/user:pass@evil.com/x", KEEP),
    (b"/v1/%40evil.com", KEEP),
    (b"/v1/evil.com:443/", KEEP),
    (b"/v1//evil.com/x", KEEP),
    (b"/v1/%252e%252e/admin", KEEP),
    (b"/v1/chat?next=http://evil/", KEEP),
    (b"/v1/chat?@evil.com", KEEP),
    (b"/v1/chat?/../../admin", KEEP),
    (b"/v1", KEEP),
]


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 30
    assert sum(kind == REJECT for _, kind in CORPUS) >= 30


@pytest.mark.parametrize(("target", "kind"), CORPUS)
def test_ssrf_corpus(target: bytes, kind: str) -> None:
    if kind == REJECT:
        with pytest.raises(RequestRejected) as info:
            forward(target)
        assert info.value.status == 400
    else:
        assert origin(forward(target)) in ORIGINS


def test_ssrf_corpus_keep_entries_go_to_their_route() -> None:
    assert forward(b"/v1/@evil.com") == "http://10.0.0.5:9000/api/@evil.com"
    assert forward(b"/v1") == "http://10.0.0.5:9000/api"
    assert forward(b"/plain@evil.com") == "http://h:9/plain@evil.com"
    assert forward(b"/plain/x?y=1") == "https://backend.internal/x?y=1"


def test_connect_through_the_pipeline() -> None:
    with pytest.raises(RequestRejected) as info:
        forward(b"evil:443", method="CONNECT")
    assert info.value.status == 405


# --- properties -------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%5c", b"\\", b"@", b":", b";",
        b"?", b"#", b"%", b"%0", b"%00", b"%0d%0a", b" ", b"a", b"v1", b"plain", b"evil.com",
        b"http:", b"\xff", b"\xc3\xa9", b"%25", b"~", b"*",
    ]
)  # fmt: skip
_TARGETS = st.one_of(
    st.binary(max_size=40),
    st.lists(_PIECES, max_size=14).map(b"".join),
    st.lists(_PIECES, max_size=14).map(lambda ps: b"/" + b"".join(ps)),
    st.lists(_PIECES, max_size=14).map(lambda ps: b"/v1/" + b"".join(ps)),
)
_UPSTREAMS = st.sampled_from(
    ["http://h:9", "http://h:9/", "http://h:9/api/", "https://10.1.2.3/a/b", "http://[::1]:1/x"]
)
_ROUTE_PREFIXES = st.sampled_from(["/", "/v1/", "/v1", "/plain", "/a/b/"])


@settings(max_examples=1500, deadline=None)
@given(raw=_TARGETS, upstream=_UPSTREAMS, prefix=_ROUTE_PREFIXES, query=_TARGETS)
def test_property_url_never_leaves_the_upstream(
    raw: bytes, upstream: str, prefix: str, query: bytes
) -> None:
    scheme, authority, base = parse_upstream(upstream)
    try:
        url = build_upstream_url(upstream, prefix, normalize_path(raw), query)
    except RequestRejected as exc:
        status = exc.status
    else:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (scheme, authority)
        assert url.startswith(f"{scheme}://{authority}{base.rstrip('/')}")
        assert parts.fragment == ""
        normalize_path(parts.path.encode("ascii"))  # what goes upstream is a safe path too
        return
    assert status == 400


@settings(max_examples=1000, deadline=None)
@given(target=_TARGETS)
def test_property_pipeline_only_reaches_configured_origins(target: bytes) -> None:
    try:
        url = forward(target)
    except RequestRejected:
        return
    assert origin(url) in ORIGINS
