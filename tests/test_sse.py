"""Tests of the sans-IO SSE parser (invariant I6).

Rules: plain synchronous tests, no I/O. Every behaviour that depends on where a chunk ends is
checked by comparing against one whole-stream feed, and the whole-stream result is checked
against a small independent port of the spec (decode the stream first, then split lines).
"""

from __future__ import annotations

import itertools
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepstream._sse import Comment, Event, SSEParser

Item = Event | Comment
Result = tuple[list[Item], str | None, int, bool, int]

BOM = b"\xef\xbb\xbf"


def run(chunks: list[bytes], **caps: int) -> Result:
    """Feed ``chunks`` to a fresh parser; return everything observable."""
    p = SSEParser(**caps)
    out: list[Item] = []
    for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.close())
    return out, p.last_id, p.events, p.overflowed, p.offset


def events(stream: bytes) -> list[Item]:
    return run([stream])[0]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def ev(
    data: str, end: int, event: str = "message", id: str | None = None, retry: int | None = None
) -> Event:
    return Event(data=data, event=event, id=id, retry=retry, end=end)


# --- an independent reference: the spec's algorithm, decoding the whole stream first ---------

_EOL_STR = re.compile(r"\r\n|\r|\n")
_EOL_BYTES = re.compile(rb"\r\n|\r|\n")


def reference(stream: bytes) -> list[Item]:
    """Straight port of the WHATWG steps, on decoded text; no caps, no chunking."""
    start = 3 if stream.startswith(BOM) else 0
    text = stream[start:].decode("utf-8", "replace")
    # Line ends are ASCII, so decoded lines and byte lines correspond one to one; the byte
    # split gives the offsets (end of a CRLF line = just after the CR, see _sse docstring).
    ends = [m.start() + 1 for m in _EOL_BYTES.finditer(stream, start)]
    lines = _EOL_STR.split(text)[:-1]  # the last piece has no terminator: discarded at EOF
    assert len(lines) == len(ends)
    out: list[Item] = []
    data, etype, last_id, retry = "", "", None, None
    for line, end in zip(lines, ends, strict=True):
        if line == "":
            if data == "":
                etype, retry = "", None
                continue
            out.append(ev(data.removesuffix("\n"), end, etype or "message", last_id, retry))
            data, etype, retry = "", "", None
            continue
        if line.startswith(":"):
            out.append(Comment(line[1:], end))
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            etype = value
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return out


# --- spec examples ---------------------------------------------------------------------------


def test_spec_example_two_messages_and_multiline_data() -> None:
    s = (
        b"data: This is the first message.\n\n"
        b"data: This is the second message, it\n"
        b"data: has two lines.\n\n"
        b"data: This is the third message.\n\n"
    )
    got = events(s)
    assert [e.data for e in got if isinstance(e, Event)] == [
        "This is the first message.",
        "This is the second message, it\nhas two lines.",
        "This is the third message.",
    ]


def test_spec_example_stock_ticker() -> None:
    assert events(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ev("YHOO\n+2\n10", 30)]


def test_spec_example_ids_and_comment() -> None:
    s = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    got = events(s)
    assert got[0] == Comment(" test stream", 14)
    assert [(e.data, e.id) for e in got[1:] if isinstance(e, Event)] == [
        ("first event", "1"),
        ("second event", ""),  # "id" with no value resets the last event ID to ""
        (" third event", ""),  # only one leading space is removed; the id persists
    ]


def test_spec_example_empty_data_lines() -> None:
    # "data" alone appends an empty line; the final "data:" has no blank line: discarded.
    got = events(b"data\n\ndata\ndata\n\ndata:")
    assert got == [ev("", 6), ev("\n", 17)]


def test_spec_example_colon_space_is_optional() -> None:
    assert events(b"data:test\n\ndata: test\n\n") == [ev("test", 11), ev("test", 23)]


def test_spec_example_event_types() -> None:
    s = b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    got = events(s)
    assert [(e.event, e.data) for e in got if isinstance(e, Event)] == [
        ("add", "73857293"),
        ("remove", "2153"),
        ("add", "113411"),
    ]


# --- field rules ------------------------------------------------------------------------------


def test_event_type_resets_after_each_block_and_empty_type_is_message() -> None:
    got = events(b"event: a\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\nevent\ndata: 4\n\n")
    assert [e.event for e in got if isinstance(e, Event)] == ["a", "message", "message", "message"]


def test_blank_line_without_data_dispatches_nothing_but_resets_type_and_retry() -> None:
    p = SSEParser()
    assert p.feed(b"event: x\nretry: 5\nid: 7\n\n") == []
    assert p.last_id == "7"
    assert p.events == 0
    assert p.feed(b"data: y\n\n") == [ev("y", 34, id="7")]
    assert p.events == 1


def test_id_persists_and_nul_is_ignored() -> None:
    got = events(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x003\ndata: c\n\nid: \xc3\xa9\ndata: d\n\n")
    assert [e.id for e in got if isinstance(e, Event)] == ["1", "1", "1", "é"]


def test_last_id_is_none_until_set() -> None:
    p = SSEParser()
    assert p.last_id is None
    assert p.feed(b"data: a\n\n") == [ev("a", 9)]
    p.feed(b"id: 9\n")
    assert p.last_id == "9"  # the buffer updates at once, before dispatch


def test_retry_only_ascii_digits_and_only_for_its_block() -> None:
    got = events(
        b"retry: 1000\ndata: a\n\n"
        b"data: b\n\n"
        b"retry: 10a\ndata: c\n\n"
        b"retry:\ndata: d\n\n"
        b"retry: -1\ndata: e\n\n"
        b"retry: \xd9\xa3\ndata: f\n\n"  # ARABIC-INDIC DIGIT THREE is not an ASCII digit
        b"retry: 1\nretry: 2\ndata: g\n\n"
    )
    assert [e.retry for e in got if isinstance(e, Event)] == [1000, None, None, None, None, None, 2]


def test_field_without_colon_and_unknown_fields() -> None:
    got = events(b"data\nfoo: bar\nData: X\ndata : y\nbar\ndata:z\n\n")
    assert got == [ev("\nz", 43)]


def test_only_one_leading_space_removed_and_colons_in_value_kept() -> None:
    assert events(b"data:   a: b:c \n\n") == [ev("  a: b:c ", 17)]


def test_comments_text_and_offsets() -> None:
    got = events(b":\n: ping\r\n:x\rdata: a\n\n")
    assert got == [Comment("", 2), Comment(" ping", 9), Comment("x", 13), ev("a", 22)]


# --- line endings -----------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending(eol: bytes) -> None:
    s = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    got = events(s)
    assert [e.data for e in got if isinstance(e, Event)] == ["a\nb", "c"]
    assert got == reference(s)


def test_mixed_line_endings() -> None:
    s = b"data: a\r\ndata: b\rdata: c\n\r\n\rdata: d\n\r\r\n"
    got = events(s)
    # "\r\n\r" after "c": CRLF is one blank line (dispatch), then a lone CR is a second one.
    assert [e.data for e in got if isinstance(e, Event)] == ["a\nb\nc", "d"]
    assert got == reference(s)


def test_lf_cr_is_two_line_ends() -> None:
    assert events(b"data: a\n\rdata: b\n\n") == [ev("a", 9), ev("b", 18)]


def test_cr_at_chunk_end_dispatches_at_once_and_next_lf_is_skipped() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n\r") == [ev("a", 10)]  # the blank line is the lone CR: nothing waits
    assert p.feed(b"\ndata: b\r") == []
    assert p.feed(b"\n") == []
    assert p.feed(b"\r") == [ev("b", 21)]
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == []  # a second LF is a real blank line (no data: nothing)
    assert p.feed(b"data: c\r\r\n") == [ev("c", 32)]


def test_lf_after_cr_is_skipped_only_once() -> None:
    assert run([b"data: a\r", b"\n", b"\n"])[0] == [ev("a", 10)]
    assert run([b"data: a\r", b"\n\n"])[0] == [ev("a", 10)]


# --- BOM --------------------------------------------------------------------------------------


def test_bom_at_start_is_stripped_and_counted_in_offsets() -> None:
    s = BOM + b"data: a\n\n"
    assert events(s) == [ev("a", 12)]
    assert run([bytes([b]) for b in s])[0] == [ev("a", 12)]
    assert run([s[:1], s[1:2], s[2:]])[0] == [ev("a", 12)]
    assert run([s[:2], s[2:4], s[4:]])[0] == [ev("a", 12)]


def test_only_one_bom_is_stripped() -> None:
    s = BOM + BOM + b"data: a\n\n"
    # The second BOM starts the first line: the field name is "\ufeffdata", unknown.
    assert events(s) == []
    assert events(BOM + b"data: a\n\n" + BOM + b"data: b\n\n") == [ev("a", 12)]


def test_bom_not_at_offset_zero_is_data() -> None:
    s = b"data: " + BOM + b"x\n\n"
    assert events(s) == [ev("\ufeffx", 12)]
    assert run([bytes([b]) for b in s])[0] == [ev("\ufeffx", 12)]


@pytest.mark.parametrize("head", [b"\xef", b"\xef\xbb", b"\xef\n", b"\xef\xbb\n", b"\xefdata"])
def test_partial_bom_is_data(head: bytes) -> None:
    s = head + b"\ndata: a\n\n"
    whole = run([s])
    assert whole == run([bytes([b]) for b in s])
    assert whole[0] == reference(s)
    assert whole[0][-1] == ev("a", len(s))


def test_empty_feeds_are_harmless() -> None:
    assert run([b"", BOM[:1], b"", BOM[1:], b"", b"data: a\r", b"", b"\n\n", b""])[0] == [
        ev("a", 13)
    ]


# --- UTF-8 ------------------------------------------------------------------------------------


def test_invalid_utf8_becomes_replacement_character() -> None:
    got = events(b"data: a\xffb\xc3(\xe2\x82\n\n")
    assert got == [ev("a\ufffdb\ufffd(\ufffd", 15)]


def test_invalid_utf8_in_event_and_id_and_comment() -> None:
    got = events(b":\xfe\nevent: \xff\nid: \x80\ndata: x\n\n")
    assert got == [Comment("\ufffd", 3), ev("x", 27, event="\ufffd", id="\ufffd")]


def test_multibyte_utf8_split_at_every_position() -> None:
    text = "é€😀 ü\u2028x"
    s = b"data: " + text.encode() + b"\r\nid: " + text.encode() + b"\r\n\r\n"
    want = events(s)
    assert want == [ev(text, len(s) - 1, id=text)]
    for i in range(len(s) + 1):
        assert run([s[:i], s[i:]])[0] == want, i
    assert run([bytes([b]) for b in s])[0] == want


def test_unicode_line_separators_are_not_line_ends() -> None:
    # U+2028, U+0085 and U+001C end lines in str.splitlines(), never in SSE.
    s = "data: a\u2028b\x85c\x1cd\n\n".encode()
    assert events(s) == [ev("a\u2028b\x85c\x1cd", len(s))]


# --- EOF --------------------------------------------------------------------------------------


def test_close_discards_unterminated_event_and_line() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\n\ndata: b\n") == [ev("a", 9)]
    assert p.close() == []
    assert p.events == 1

    p = SSEParser()
    assert p.feed(b"data: a\n\n: no terminator") == [ev("a", 9)]
    assert p.close() == []


def test_feed_after_close_is_an_error() -> None:
    p = SSEParser()
    p.close()
    with pytest.raises(RuntimeError):
        p.feed(b"data: x\n\n")


# --- offsets ----------------------------------------------------------------------------------

_BLANK_TAIL = re.compile(rb"(\r\n|\r|\n)(\r|\n)\Z")


def test_end_offsets_are_exact() -> None:
    s = BOM + b": hi\r\ndata: a\r\n\r\nid: 1\rdata: b\r\rdata: c\n\ndata: d\r\n\r\n"
    got = events(s)
    assert [type(e) for e in got] == [Comment, Event, Event, Event, Event]
    assert got[0].end == len(BOM + b": hi\r")
    for e in got:
        if isinstance(e, Event):
            head = s[: e.end]
            assert _BLANK_TAIL.search(head), head  # ends with a line end plus a blank line
            assert events(head)[-1] == e  # cutting there loses nothing of that event
    assert s[got[-1].end :] == b"\n"  # only the LF of the final CRLF is left over


def test_offset_counts_every_byte_fed() -> None:
    p = SSEParser(max_line_bytes=4)
    p.feed(BOM)
    p.feed(b"data: ab\n\n")  # overflows: 8-byte line
    p.feed(b"xyz")
    assert p.offset == 3 + 10 + 3
    assert p.overflowed


# --- caps -------------------------------------------------------------------------------------


def test_oversized_line_overflows_and_buffer_stays_small() -> None:
    p = SSEParser()  # 1 MiB line cap
    assert p.feed(b"data: ok\n\n") == [ev("ok", 10)]
    piece = b"x" * (64 << 10)
    got: list[Item] = []
    for _ in range(160):  # 10 MiB, no line end
        got.extend(p.feed(piece))
        assert p.buffered <= (1 << 20) + len(piece)
    assert got == []
    assert p.overflowed
    assert p.buffered == 0
    assert len(p._buf) == 0
    assert p.feed(b"\n\ndata: later\n\n") == []  # parsing has stopped for good
    assert p.offset == 10 + (160 << 16) + 15
    assert p.events == 1


def test_oversized_complete_line_in_one_chunk() -> None:
    s = b"data: a\n\n" + b"data: " + b"y" * 100 + b"\n\ndata: b\n\n"
    out, _, n, overflowed, _ = run([s], max_line_bytes=50)
    assert out == [ev("a", 9)]
    assert (n, overflowed) == (1, True)
    # exactly at the cap is fine
    out, *_, overflowed, _ = run([b"data:" + b"z" * 45 + b"\n\n"], max_line_bytes=50)
    assert not overflowed
    assert out[0] == ev("z" * 45, 52)


def test_oversized_event_overflows() -> None:
    p = SSEParser(max_line_bytes=100, max_event_bytes=1000)
    assert p.feed(b"data: small\n\n") == [ev("small", 13)]
    got: list[Item] = []
    for _ in range(100):
        got.extend(p.feed(b"data: " + b"e" * 90 + b"\n"))  # each line under the line cap
    assert got == []
    assert p.overflowed
    assert p.buffered == 0
    assert p._data == []
    assert p.feed(b"\n") == []


def test_event_cap_boundary() -> None:
    # The event size is the spec's data buffer: each data value plus its "\n".
    p = SSEParser(max_event_bytes=10)
    assert p.feed(b"data: 1234\ndata: 1234\n\n") == [ev("1234\n1234", 23)]
    assert not p.overflowed
    assert p.feed(b"data: 1234\ndata: 12345\n") == []
    assert p.overflowed


def test_comments_do_not_count_toward_event_cap() -> None:
    p = SSEParser(max_line_bytes=100, max_event_bytes=20)
    for _ in range(100):
        p.feed(b": keep-alive ping\n")
    assert not p.overflowed
    assert p.feed(b"data: 0123456789\n\n") == [ev("0123456789", 100 * 18 + 18)]


def test_long_line_in_one_byte_feeds_is_linear() -> None:
    n = 256 << 10
    p = SSEParser()
    t0 = time.perf_counter()
    p.feed(b"data: ")
    x = b"x"
    for _ in range(n):
        p.feed(x)
    got = p.feed(b"\n\n")
    elapsed = time.perf_counter() - t0
    assert got == [ev("x" * n, n + 8)]
    assert elapsed < 5  # quadratic rescanning would take minutes


# --- chunking independence --------------------------------------------------------------------

MIXED = (
    BOM
    + b": comment \xe2\x9c\x93\r\n"
    + b"retry: 3000\r"
    + b"id: \xf0\x9f\x98\x80-1\n"
    + b"event: upd\xc3\xa4te\r\n"
    + b"data: caf\xc3\xa9 \xff\xfe\r"
    + b"data\n"
    + b"data:"
    + BOM
    + b"x\r\n"
    + b"\r\n"
    + b"id: a\x00b\r"
    + b"data:  two\n\r"
    + b"\n"
    + b"dat\xe2\x82\xacs: ignored\r\r"
    + b"event: e\nid\ndata: \xe2\x82\n"
    + b"\r"
    + b":tail\r"
)


def test_mixed_sample_matches_reference() -> None:
    got = events(MIXED)
    assert got == reference(MIXED)
    assert sum(isinstance(e, Event) for e in got) == 3


def test_every_single_split_point() -> None:
    want = run([MIXED])
    for i in range(len(MIXED) + 1):
        assert run([MIXED[:i], MIXED[i:]]) == want, i


def test_every_pair_of_split_points() -> None:
    sample = b"\xef\xbb\xbfdata: \xc3\xa9\r\n\r:c\rid: 1\n\ndata\r\n\r"
    want = run([sample])
    n = len(sample)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert run([sample[:i], sample[i:j], sample[j:]]) == want, (i, j)


def _random_stream(rng: random.Random) -> bytes:
    pieces = [BOM] if rng.random() < 0.3 else []
    for _ in range(rng.randrange(5, 40)):
        kind = rng.random()
        if kind < 0.15:
            line = b""
        elif kind < 0.25:
            line = b":" + rng.choice([b"", b" ping", b"\xe2\x9c\x93"])
        else:
            name = rng.choice([b"data", b"data", b"event", b"id", b"retry", b"x", BOM + b"data"])
            sep = rng.choice([b":", b": ", b"", b":  "])
            value = rng.choice(
                [b"", b"v", b"12", b"caf\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"a\x00b", BOM]
            )
            line = name + sep + value
        pieces.append(line + rng.choice([b"\n", b"\r", b"\r\n"]))
    return b"".join(pieces)


def _random_chunks(rng: random.Random, s: bytes) -> list[bytes]:
    mode = rng.random()
    if mode < 0.1:
        return [bytes([b]) for b in s]
    cuts = [rng.randrange(len(s) + 1) for _ in range(rng.randrange(1, 12))]
    return split_at(s, cuts)


def test_ten_thousand_random_chunkings() -> None:
    rng = random.Random(20240611)
    runs = mismatches = 0
    for _ in range(200):
        s = _random_stream(rng)
        want = run([s])
        assert want[0] == reference(s)
        for _ in range(50):
            runs += 1
            if run(_random_chunks(rng, s)) != want:
                mismatches += 1
    assert runs >= 10_000
    assert mismatches == 0


# --- hypothesis -------------------------------------------------------------------------------

_EOLS = st.sampled_from([b"\n", b"\r", b"\r\n"])
_VALUE = st.one_of(
    st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=4),
    st.sampled_from([b"", b" ", b"  x", b"123", b"a:b", BOM, b"\x00", b"\xe2\x82", b"\xc3\xa9"]),
)
_LINE = st.one_of(
    st.just(b""),
    _VALUE.map(lambda v: b":" + v),
    st.tuples(
        st.sampled_from([b"data", b"event", b"id", b"retry", b"", b"dat", b"Data", BOM + b"id"]),
        st.sampled_from([b":", b": ", b"", b"::"]),
        _VALUE,
    ).map(b"".join),
)
_STREAM = st.tuples(
    st.sampled_from([b"", BOM, BOM[:2], BOM + BOM]),
    st.lists(st.tuples(_LINE, _EOLS).map(b"".join), max_size=25).map(b"".join),
    st.binary(max_size=3),
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(stream=_STREAM, data=st.data())
def test_property_chunking_never_matters(stream: bytes, data: st.DataObject) -> None:
    want = run([stream])
    assert want[0] == reference(stream)
    if data.draw(st.booleans(), label="one_byte_feeds"):
        chunks = [bytes([b]) for b in stream]
    else:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
        chunks = split_at(stream, cuts)
    assert run(chunks) == want


@settings(max_examples=200, deadline=None)
@given(stream=_STREAM, data=st.data())
def test_property_chunking_never_matters_with_small_caps(
    stream: bytes, data: st.DataObject
) -> None:
    caps = {"max_line_bytes": 8, "max_event_bytes": 16}
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    assert run(split_at(stream, cuts), **caps) == run([stream], **caps)


# --- count mode (the proxy's hot path) ---------------------------------------------------------


def _count_vs_feed(chunks: list[bytes], **caps: int) -> None:
    """``count`` over ``chunks`` reports exactly what ``feed`` over the same chunks returns."""
    fed = SSEParser(**caps)
    counted = SSEParser(**caps)
    for chunk in chunks:
        items = fed.feed(chunk)
        n = counted.count(chunk)
        assert n == sum(1 for i in items if isinstance(i, Event))
        assert counted.events == fed.events
        assert counted.last_id == fed.last_id
        assert counted.overflowed == fed.overflowed
        assert counted.boundary == fed.boundary
        assert counted.buffered <= fed.buffered
        if items:
            assert fed.boundary == items[-1].end
        events = [i for i in items if isinstance(i, Event)]
        if events:
            assert counted.dispatched_id == events[-1].id


@settings(max_examples=400, deadline=None)
@given(stream=_STREAM, data=st.data(), small=st.booleans())
def test_property_count_mode_equals_feed(stream: bytes, data: st.DataObject,
                                          small: bool) -> None:
    caps = {"max_line_bytes": 8, "max_event_bytes": 16} if small else {}
    if data.draw(st.booleans(), label="one_byte_feeds"):
        chunks = [bytes([b]) for b in stream]
    else:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
        chunks = split_at(stream, cuts)
    _count_vs_feed(chunks, **caps)


def test_count_mode_random_chunkings() -> None:
    rng = random.Random(20261201)
    for _ in range(300):
        s = _random_stream(rng)
        _count_vs_feed(_random_chunks(rng, s))
        _count_vs_feed(_random_chunks(rng, s), max_line_bytes=6, max_event_bytes=12)


_DATA_LINE = st.tuples(
    st.sampled_from([b"data:", b"data: "]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"x").replace(b"\r", b"y")),
).map(b"".join)
_ODD_LINE = st.sampled_from([b"", b"id: 7", b": ping", b"event: e", b"data", b"database: x",
                             b"data:\r"])
_DATA_STREAM = st.lists(
    st.one_of(
        st.lists(_DATA_LINE, min_size=1, max_size=3).map(lambda ls: b"\n".join(ls) + b"\n\n"),
        _ODD_LINE.map(lambda line: line + b"\n"),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(stream=_DATA_STREAM, cuts=st.lists(st.integers(0, 2000), max_size=12),
       small=st.booleans())
def test_property_count_mode_on_data_only_streams(stream: bytes, cuts: list[int],
                                                   small: bool) -> None:
    """The stream shape the proxy sees most (``data:`` lines and blank lines, LF only) takes
    count()'s C-level path; an odd line here and there (ids, comments, double blanks, fields
    named like data) sends a chunk back to the line loop. Same results as feed() either way."""
    caps = {"max_line_bytes": 24, "max_event_bytes": 40} if small else {}
    _count_vs_feed(split_at(stream, cuts), **caps)


_ONE_EVENT = _DATA_LINE.map(lambda line: line + b"\n\n")
_OTHER_READ = st.one_of(
    st.sampled_from([b"\xef\xbb\xbf", b"\xef\xbb", b"data: half", b"id: 9\n", b"id: 10\ndata: x\n",
                     b"\r", b"\n", b"\r\n", b": ping\n\n", b"data: a\r\n\r\n", b"data: a\n",
                     b"\ndata: b\n\n", b"data: c\n\ndata: d\n\n", b"event: e\ndata: f\n\n",
                     b"data: g\nid: 5\n\n", b"data: h\rid: 6\n\n", b"data: 1234567\n"]),
    st.binary(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(reads=st.lists(st.one_of(_ONE_EVENT, _ONE_EVENT, _OTHER_READ), max_size=30),
       small=st.booleans())
def test_property_count_mode_one_event_per_read(reads: list[bytes], small: bool) -> None:
    """Each read one whole ``data:`` event (count()'s shortest path, the paced stream's
    usual read), among reads that leave state behind for the next one: a BOM or part of it, a
    partial line, a CR whose LF may follow, an id, a data line of an event in progress, caps
    within reach. Same results as feed() after every read."""
    caps = {"max_line_bytes": 12, "max_event_bytes": 20} if small else {}
    _count_vs_feed(reads, **caps)


def test_count_mode_one_event_reads_keep_the_resume_point() -> None:
    parser = SSEParser()
    assert parser.count(b"id: 1\n") == 0
    assert parser.count(b"data: one\n\n") == 1
    assert (parser.events, parser.dispatched_id, parser.boundary) == (1, "1", 17)
    assert parser.count(b"data: two\n") == 0  # an event in progress...
    assert parser.count(b"data: more\n\n") == 1  # ...that this read ends: one event
    assert (parser.events, parser.dispatched_id, parser.offset) == (2, "1", 39)
    assert parser.buffered == 0


def test_count_mode_one_event_read_over_the_event_cap() -> None:
    """A short read that would end the event in progress past ``max_event_bytes``: the cap
    applies (overflow, as feed() does), even though the read alone is well within it."""
    _count_vs_feed([b"data: 12345\n", b"data: 1234\n\n"], max_line_bytes=12, max_event_bytes=8)
    parser = SSEParser(max_line_bytes=12, max_event_bytes=8)
    parser.count(b"data: 12345\n")
    assert parser.count(b"data: 1234\n\n") == 0 and parser.overflowed
