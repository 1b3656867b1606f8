"""Request, header and URL rules: keepstream is never an open proxy (invariant I9 in DESIGN.md).

Design rules:

* Sans-IO and stdlib only: plain functions over bytes and str, no trio, no await.
* Upstreams come only from configured routes. The request target must be origin-form
  (``/path``); absolute-form (``http://host/``), authority-form (``host:443``), asterisk-form
  (``*``), ``CONNECT`` and network-path references (``//host``) are refused.
* The path is checked, never rewritten: ``normalize_path`` percent-decodes only to *look* at
  it, and refuses dot segments (literal or encoded, also ``..;param``), encoded ``/`` and
  ``\\``, literal ``\\``, control characters (literal or encoded), bad escapes and any byte
  outside RFC 3986 ``pchar``. What it returns is the client's raw path, byte for byte, so no
  decode/re-encode round trip can change what the upstream sees, and no HTTP client
  re-encodes it either.
* The upstream URL is the route's origin plus that path: ``build_upstream_url`` re-parses its
  result and refuses it unless scheme and authority are exactly the route's.
* Routes match on whole path segments: prefix ``/v1`` matches ``/v1`` and ``/v1/x``, never
  ``/v1x`` or ``/v1@evil``; prefix ``/v1/`` also matches ``/v1``.
* Hop-by-hop headers and every header named by ``Connection`` are never forwarded, either
  way. ``Host`` and ``Content-Length`` are never copied: the client library sets them.
* Every refusal of a client's request is a ``RequestRejected`` carrying the HTTP status to
  answer with. Bad configuration (``parse_upstream``) is a ``ValueError``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from ._errors import KeepstreamError

__all__ = [
    "HOP_BY_HOP",
    "RequestRejected",
    "build_upstream_url",
    "check_request",
    "filter_request_headers",
    "filter_response_headers",
    "match_route",
    "normalize_path",
    "parse_upstream",
]

HOP_BY_HOP: frozenset[bytes] = frozenset(
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

_NOT_FROM_CLIENT = HOP_BY_HOP | {b"host", b"content-length"}
_NOT_FROM_UPSTREAM = HOP_BY_HOP | {b"content-length"}


class RequestRejected(KeepstreamError):
    """The request is refused; answer it with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


# --- headers ----------------------------------------------------------------------------------


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token:
                    names.add(token)
    return names


def _filter(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    lowered = [(name.lower(), value) for name, value in headers]
    named = _connection_tokens(lowered)
    return [(n, v) for n, v in lowered if n not in drop and n not in named]


def filter_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Client headers to forward upstream: names lowercased, order and duplicates kept.

    Drops hop-by-hop headers, those named in any ``Connection`` header, ``Host`` (the upstream
    gets its own) and ``Content-Length`` (recomputed from the body by the client library).
    """
    return _filter(headers, _NOT_FROM_CLIENT)


def filter_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream headers to send to the client: names lowercased, order and duplicates kept.

    Drops hop-by-hop headers, those named in any ``Connection`` header and ``Content-Length``
    (keepstream frames the body itself).
    """
    return _filter(headers, _NOT_FROM_UPSTREAM)


# --- request line and framing -----------------------------------------------------------------

_BAD_HEADER_BYTES = re.compile(rb"[\x00\r\n]")


def check_request(method: str, raw_path: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse requests keepstream must not proxy; raise ``RequestRejected``, else return None.

    ``raw_path`` is the request target as received (a query after it is allowed).
    """
    if method.upper() == "CONNECT":
        raise RequestRejected(405, "CONNECT is not supported")
    if not raw_path.startswith(b"/"):
        raise RequestRejected(400, "request target must be origin-form (start with '/')")
    if raw_path.startswith(b"//"):
        raise RequestRejected(400, "request target must not start with '//'")
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    for name, value in headers:
        if _BAD_HEADER_BYTES.search(name) or _BAD_HEADER_BYTES.search(value):
            raise RequestRejected(400, "NUL, CR or LF in a header")
        lname = name.lower()
        if lname == b"content-length":
            lengths.extend(part.strip(b" \t") for part in value.split(b","))
        elif lname == b"transfer-encoding":
            encodings.append(value)
    if lengths and encodings:
        raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
    if lengths:
        if not all(v.isdigit() for v in lengths):  # bytes.isdigit(): ASCII digits, non-empty
            raise RequestRejected(400, "invalid Content-Length")
        # Compared as digit strings without leading zeros: int() on thousands of digits
        # raises (Python's 4300-digit limit), and no length needs it.
        if len({v.lstrip(b"0") for v in lengths}) != 1:
            raise RequestRejected(400, "conflicting Content-Length values")
    if encodings and (len(encodings) != 1 or encodings[0].strip(b" \t").lower() != b"chunked"):
        raise RequestRejected(501, "only Transfer-Encoding: chunked is supported")


#: Most bytes of a request head keepstream accepts: target, query and header lines. Hypercorn's
#: ``h11_max_incomplete_size`` (16 KiB) only bounds a head still incomplete after a read, so a
#: head that arrives in one read could otherwise be much larger.
MAX_HEAD_BYTES = 16 * 1024


def check_head_size(raw_path: bytes, query: bytes, headers: Sequence[tuple[bytes, bytes]],
                    limit: int = MAX_HEAD_BYTES) -> None:
    """Raise ``RequestRejected(431)`` when the request head is over ``limit`` bytes."""
    size = len(raw_path) + len(query)
    for name, value in headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    if size > limit:
        raise RequestRejected(431, f"request head over {limit} bytes")


# --- paths ------------------------------------------------------------------------------------

# RFC 3986 path characters: unreserved / pct-encoded / sub-delims / ":" / "@", plus "/".
_PATH_CHARS = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})?")
_DOT_SEGMENTS = frozenset({b".", b".."})


def normalize_path(raw_path: bytes) -> str:
    """Check a raw (still percent-encoded) path, without its query; return it unchanged as str.

    Raises ``RequestRejected(400)`` for anything that could make the upstream resolve a path
    other than the one routed: dot segments (``..``, ``%2e%2E``, ``..;x``), ``%2F``, ``%5C``,
    ``\\``, control characters raw or encoded, invalid ``%`` escapes, non-ASCII bytes and any
    other byte that is not allowed in an RFC 3986 path.
    """
    if not raw_path.startswith(b"/") or raw_path.startswith(b"//"):
        raise RequestRejected(400, "path must start with a single '/'")
    if not _PATH_CHARS.fullmatch(raw_path):
        raise RequestRejected(400, "invalid character in path")
    has_pct = b"%" in raw_path
    for segment in raw_path.split(b"/"):
        if has_pct and b"%" in segment:
            segment = _pct_decode(segment)
        if segment.split(b";", 1)[0] in _DOT_SEGMENTS:
            raise RequestRejected(400, "dot segment in path")
    return raw_path.decode("ascii")


def _pct_decode(segment: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        hex2 = m.group(1)
        if hex2 is None:
            raise RequestRejected(400, "invalid percent escape in path")
        byte = int(hex2, 16)
        if byte < 0x20 or byte == 0x7F:
            raise RequestRejected(400, "encoded control character in path")
        if byte in (0x2F, 0x5C):
            raise RequestRejected(400, "encoded '/' or '\\' in path")
        return bytes((byte,))

    return _PCT.sub(one, segment)


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


def match_route(prefixes: Sequence[str], path: str) -> int | None:
    """Index of the longest prefix matching ``path`` on segment boundaries, or None.

    ``"/v1/"`` matches ``"/v1"`` and ``"/v1/..."``; ``"/v1"`` matches ``"/v1"`` and
    ``"/v1/..."`` but not ``"/v1x"``; ``"/"`` matches every path. Ties go to the first.
    """
    best: int | None = None
    best_len = -1
    for i, prefix in enumerate(prefixes):
        if len(prefix) > best_len and _prefix_matches(prefix, path):
            best, best_len = i, len(prefix)
    return best


# --- upstream URLs ----------------------------------------------------------------------------

_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_BAD_QUERY_BYTES = re.compile(rb"[\x00-\x20\x7f-\xff#]")


@functools.lru_cache(maxsize=256)
def parse_upstream(url: str) -> tuple[str, str, str]:
    """Validate a route's upstream base URL; return ``(scheme, authority, base_path)``.

    Only ``http``/``https`` with a host; no userinfo, query or fragment; the base path must
    itself pass ``normalize_path`` (or be empty). Raises ``ValueError`` saying what is wrong.
    """
    if _BAD_URL_CHARS.search(url):
        raise ValueError(f"upstream {url!r}: whitespace, control characters or '\\' not allowed")
    if not url.isascii():
        raise ValueError(f"upstream {url!r}: must be ASCII (write IDN hosts in punycode)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"upstream {url!r}: scheme must be http or https")
    if not url[len(parts.scheme) :].startswith("://"):
        raise ValueError(f"upstream {url!r}: must look like http://host[:port][/path]")
    if "@" in parts.netloc:
        raise ValueError(f"upstream {url!r}: userinfo (user@) not allowed")
    if not parts.hostname:
        raise ValueError(f"upstream {url!r}: no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"upstream {url!r}: invalid port") from None
    if "?" in url or parts.query:
        raise ValueError(f"upstream {url!r}: query not allowed")
    if "#" in url or parts.fragment:
        raise ValueError(f"upstream {url!r}: fragment not allowed")
    base = parts.path
    if base:
        try:
            normalize_path(base.encode("ascii"))
        except (RequestRejected, UnicodeEncodeError):
            raise ValueError(f"upstream {url!r}: invalid base path {base!r}") from None
    return scheme, parts.netloc, base


def build_upstream_url(upstream: str, prefix: str, path: str, query: bytes) -> str:
    """The URL to forward to: upstream origin + base path + the part of ``path`` after ``prefix``.

    ``path`` must come from ``normalize_path`` and match ``prefix`` (see ``match_route``).
    With a prefix ending in ``/`` the base path gets a trailing ``/`` and the rest is appended
    (``/v1/`` -> ``http://h/api/``: ``/v1/chat`` -> ``http://h/api/chat``, ``/v1`` ->
    ``http://h/api``); otherwise the rest (empty or starting with ``/``) follows the base
    without its trailing ``/``. The query is appended unless it holds ``#``, spaces, control
    or non-ASCII bytes (``RequestRejected(400)``). The result is re-parsed: a URL whose scheme
    or authority is not exactly the upstream's raises ``RequestRejected(400)``.
    """
    try:
        scheme, authority, base = parse_upstream(upstream)
    except ValueError:
        raise RequestRejected(502, "route has an invalid upstream") from None
    if not _prefix_matches(prefix, path):
        raise RequestRejected(400, "path does not match the route prefix")
    if prefix.endswith("/"):
        if len(path) < len(prefix):  # "/v1" routed by "/v1/": the base itself
            upstream_path = base.rstrip("/") or "/"
        else:
            upstream_path = base.rstrip("/") + "/" + path[len(prefix) :]
    else:
        rest = path[len(prefix) :]
        upstream_path = (base.rstrip("/") + rest) or "/"
    normalize_path(upstream_path.encode("ascii", "replace"))
    url = f"{scheme}://{authority}{upstream_path}"
    if query:
        if _BAD_QUERY_BYTES.search(query):
            raise RequestRejected(400, "invalid character in query string")
        url += "?" + query.decode("ascii")
    check = urlsplit(url)
    if check.scheme != scheme or check.netloc != authority or check.path != upstream_path:
        raise RequestRejected(400, "request would leave the route's upstream")
    return url
