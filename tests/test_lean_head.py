"""The lean engine's fast request-head parse (``_h1._parse_head``) against h11.

Whatever head the fast parse takes, h11 must take the same way: the same method, target,
version and headers (names lower-cased, values trimmed), no body, and the same bytes left for
the next request. What it declines goes to h11 whole, so declining is always safe; the tests
also check that it takes the plain heads a streaming client sends (or it would be dead code).
"""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from keepstream._h1 import MAX_HEAD, _Head, _parse_head


def _h11(data: bytes) -> tuple[object, object, bytes]:
    """h11's reading of ``data``: the first event (or the error), the next one, what is
    left over."""
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    h.receive_data(data)
    try:
        first = h.next_event()
        second = h.next_event()
    except h11.RemoteProtocolError as exc:
        return exc, None, b""
    return first, second, bytes(h.trailing_data[0])


def _fast(data: bytes) -> tuple[_Head | None, bytes]:
    buf = bytearray(data)
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None, bytes(buf)
    return _parse_head(buf, end), bytes(buf)


def _same(data: bytes) -> _Head | None:
    head, rest = _fast(data)
    if head is None:
        assert rest == data  # declined: nothing taken out of the buffer
        return None
    first, second, left = _h11(data)
    assert isinstance(first, h11.Request), (data, first)
    assert (head.method, head.target, head.http_version) == \
        (first.method, first.target, first.http_version)
    assert head.headers == list(first.headers)
    assert isinstance(second, h11.EndOfMessage), (data, second)  # no body
    assert left == rest  # the next request's bytes
    return head


def test_plain_heads_are_taken_and_read_as_h11_reads_them() -> None:
    for data in [
        b"GET /v1/stream?x=1 HTTP/1.1\r\nHost: a:1\r\nAccept: text/event-stream\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nhost: a\r\n\r\nGET /next HTTP/1.1\r\n",
        b"HEAD /x HTTP/1.1\r\nhost:a\r\nX-Odd: \t spaced  value \t\r\nlast-event-id:  7 \r\n\r\n",
        b"DELETE /x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer \xe9t\xe9\r\n\r\n",
    ]:
        assert _same(data) is not None, data


def test_heads_h11_must_read_are_declined() -> None:
    for data in [
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi",  # a body
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\n\r\n",
        b"GET /x HTTP/1.1\r\naccept: */*\r\n\r\n",  # no Host: h11 answers 400
        b"GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nx: folded\r\n  on\r\n\r\n",  # obs-fold
        b"GET /x HTTP/1.1\r\nhost: a\r\nbad name: v\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nx: nul\x00\r\n\r\n",
        b"GET  /x HTTP/1.1\r\nhost: a\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\n" + b"x: " + b"y" * MAX_HEAD + b"\r\n\r\n",
    ]:
        head, rest = _fast(data)
        assert head is None and rest == data, data


_token = st.text(alphabet="abcXYZ-_!~09", min_size=1, max_size=6).map(str.encode)
#: Field-value characters h11 allows (obs-text, DEL and other controls but NUL and \s among
#: them) and some it does not.
_ok_char = st.sampled_from([b"a", b"Z", b"/", b"?", b"=", b"%", b" ", b"\t", b":", b"\xe9",
                            b"\x7f", b"\x01", b"\"", b"\\", b"\xff"])
_bad_char = st.sampled_from([b"\x00", b"\r", b"\n", b"\x0b", b"\x0c"])
_ok_value = st.lists(_ok_char, max_size=8).map(b"".join)
_any_value = st.lists(st.one_of(_ok_char, _bad_char), max_size=8).map(b"".join)
_sep = st.sampled_from([b":", b": ", b":\t", b":  \t "])
_ok_line = st.tuples(
    st.one_of(_token, st.sampled_from([b"Host", b"last-event-id", b"Accept"])), _sep, _ok_value,
).map(b"".join)
_odd_line = st.one_of(
    st.tuples(st.sampled_from([b"content-length", b"Transfer-Encoding", b"expect", b"HOST",
                               b"bad name", b" lead", b"x\x00", b""]),
              st.sampled_from([b":", b": ", b" :"]), _ok_value).map(b"".join),
    st.tuples(_token, _sep, _any_value).map(b"".join),
    _any_value,  # anything at all, a continuation line among them
)
_line = st.one_of(_ok_line, _ok_line, _ok_line, _ok_line, _odd_line)
_ok_request_line = st.tuples(
    st.one_of(_token, st.sampled_from([b"GET", b"HEAD", b"get"])), st.just(b" "),
    st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"/~%20"]), st.just(b" "),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
).map(b"".join)
_odd_request_line = st.tuples(
    st.sampled_from([b"GET", b"G T", b"", b"M\x00"]),
    st.sampled_from([b" ", b"  ", b"\t"]),
    st.sampled_from([b"/", b"/\xe9", b"/a b", b""]),
    st.sampled_from([b" ", b"  "]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1", b"HTTP/0.9"]),
).map(b"".join)
_request_line = st.one_of(_ok_request_line, _ok_request_line, _odd_request_line)


@settings(max_examples=600, deadline=None)
@given(request_line=_request_line, lines=st.lists(_line, max_size=5),
       host=st.sampled_from([True, True, True, False]),
       after=st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"\r\n", b"x"]))
def test_whatever_the_fast_parse_takes_h11_takes_the_same_way(
    request_line: bytes, lines: list[bytes], host: bool, after: bytes
) -> None:
    head = [request_line, *([b"host: h"] if host else []), *lines]
    _same(b"\r\n".join(head) + b"\r\n\r\n" + after)
