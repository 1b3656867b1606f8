"""Differential fuzzing of the chunked decoder (``keepstream._transport._ChunkedDecoder``)
against a reference decoder written from RFC 9112 section 7.1 (``reference_decode``).

``check_chunked(wire, cuts, fast_min, expect)`` is the one check; it feeds ``wire`` to the real
decoder in the pieces ``cuts`` makes (with ``_FAST_MIN`` set to ``fast_min``, so that the fast
path is tried after every chunk's end or only on long reads) and asserts:

* the decoder and the reference agree on the outcome: the body is complete ("done"), the
  framing is malformed ("error": ``httpx.RemoteProtocolError``, nothing else) or the input
  ended first ("incomplete"), and on the bytes: the whole body when done, else exactly the
  chunk data before the fault or the end of the input (the bytes decoded before an error are
  yielded first, as the transport's docstring says);
* ``done`` is set once, by the feed that holds the body's last byte; ``leftover`` is empty
  until then, and then holds exactly the rest of that feed (the caller keeps the later pieces);
* what the decoder holds back between feeds stays under ``MAX_CHUNK_LINE`` bytes;
* the trailer section it has consumed leaves room for the final CRLF under ``MAX_TRAILERS``;
* when the generator built the input to be something (``expect``: a valid body, a given fault
  in chunk k, a truncation), the reference says exactly that, so the reference is checked too.

Two things call it: the seeded loop here (``test_random_bodies``, a few thousand generated
inputs in well under 5 s, each fed whole, in random pieces and sometimes one byte at a time)
and the coverage-guided atheris harness ``fuzz/fuzz_chunked.py``.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import pytest
import trio

from keepstream import _transport
from keepstream._transport import MAX_CHUNK_LINE, MAX_TRAILERS, _ChunkedDecoder
from tests.test_transport import body_until_error, read_request, start

FAST_MIN = _transport._FAST_MIN  # the module's own value; check_chunked sets it per input

# -- the reference decoder ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a chunked body decodes to. ``kind`` is "done" (the last chunk and the trailer
    section are complete; ``leftover`` is what follows them), "error" (malformed framing;
    ``body`` is the chunk data before the fault) or "incomplete" (the input ended first;
    ``body`` is the chunk data so far)."""

    kind: str
    body: bytes
    leftover: bytes = b""


#: CTL (RFC 5234) but HTAB: never valid in a chunk-ext or a field value.
_CTL = rb"\x00-\x08\x0a-\x1f\x7f"
#: chunk-size (1 to 16 hex digits), BWS, and a chunk-ext: ";" and no CTL but HTAB.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^%s]*)?" % _CTL)
#: field-line (RFC 9110 section 5, RFC 9112 section 5): a token, ":", then OWS, field-vchars
#: (VCHAR, obs-text), SP and HTAB in any order: anything but a CTL.
_FIELD_LINE = re.compile(rb"[-!#$%%&'*+.^_`|~0-9A-Za-z]+:[^%s]*" % _CTL)


def reference_decode(wire: bytes) -> Outcome:
    """Decode a whole chunked body at once, by RFC 9112 section 7.1::

        chunked-body    = *chunk last-chunk trailer-section CRLF
        chunk           = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        chunk-size      = 1*HEXDIG
        last-chunk      = 1*("0") [ chunk-ext ] CRLF
        chunk-ext       = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
        trailer-section = *( field-line CRLF )

    with the choices ``_ChunkedDecoder`` documents or makes on purpose:

    * chunk-size has at most 16 hex digits (leading zeros count); no sign, ``0x``, ``_`` or
      whitespace before it;
    * BWS (SP, HTAB) may follow the size, before ``;`` or before the CRLF;
    * a chunk-ext is ``;`` and anything up to the CRLF but a control character (HTAB is
      allowed), otherwise unparsed (section 7.1.1: unrecognized extensions are ignored). The
      RFC's grammar (tokens and quoted strings) never holds a control character, and h11
      refuses a bare LF there, so a bare CR, LF, NUL or DEL is malformed;
    * a trailer line is a field-line (``_FIELD_LINE``: a token, ``:``, a value without
      control characters), else malformed; an obs-fold (a line starting with SP or HTAB) is
      one too, as in the response head. Valid ones are dropped (7.1.2);
    * a line ends with CRLF only: a bare CR or LF is a byte of the line (and so malformed in
      an extension or a trailer);
    * a size or trailer line, with its CRLF, is at most ``MAX_CHUNK_LINE`` bytes; once that
      many bytes have come without a CRLF, the framing is malformed;
    * the trailer section, its final CRLF included, is at most ``MAX_TRAILERS`` bytes: it is
      malformed once that many bytes of it have come without its end, or at the end of a
      trailer line that leaves no room for the final CRLF;
    * a fault counts once the rules make it certain: at the end of its line, at those caps,
      or once both bytes after a chunk's data are there; before that the input is incomplete.
    """
    body = bytearray()
    pos = 0
    n = len(wire)
    trailers = -1  # where the trailer section starts, once the last-chunk line is read
    while True:
        # The next line: it must end (CRLF included) within MAX_CHUNK_LINE bytes.
        end = wire.find(b"\r\n", pos)
        if end < 0 or end + 2 - pos > MAX_CHUNK_LINE:
            capped = n - pos >= MAX_CHUNK_LINE or 0 <= trailers <= n - MAX_TRAILERS
            return Outcome("error" if capped else "incomplete", bytes(body))
        line = wire[pos:end]
        pos = end + 2
        if trailers >= 0:
            if not line:  # the end of the trailer section; the check below leaves room
                return Outcome("done", bytes(body), wire[pos:])
            if _FIELD_LINE.fullmatch(line) is None or pos - trailers > MAX_TRAILERS - 2:
                return Outcome("error", bytes(body))
            continue  # a trailer field line, dropped
        m = _SIZE_LINE.fullmatch(line)
        if m is None:
            return Outcome("error", bytes(body))
        size = int(m.group(1), 16)
        if size == 0:
            trailers = pos  # last-chunk
            continue
        data = wire[pos : pos + size]
        body += data
        pos += len(data)
        if len(data) < size or n - pos < 2:
            return Outcome("incomplete", bytes(body))
        if wire[pos : pos + 2] != b"\r\n":
            return Outcome("error", bytes(body))
        pos += 2


# -- the check ---------------------------------------------------------------------------------


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (positions in it, any order, out-of-range ones clamped)."""
    n = len(data)
    bounds = sorted({0, n, *(c if 0 <= c <= n else min(max(c, 0), n) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_decoder(pieces: Sequence[bytes]) -> tuple[Outcome, tuple[int, int]]:
    """Feed ``pieces`` to a fresh ``_ChunkedDecoder`` as ``_Body`` does (until ``done``), with
    the per-feed checks; return what came out and where in the input the piece that set
    ``done`` was ((-1, -1) if none did)."""
    dec = _ChunkedDecoder()
    got = bytearray()
    offset = 0
    for i, piece in enumerate(pieces):
        offset += len(piece)
        try:
            out = dec.feed(piece)
        except httpx.RemoteProtocolError:
            assert not dec.done
            got += dec.partial  # what this feed decoded before the fault
            return Outcome("error", bytes(got)), (-1, -1)
        got += out
        assert len(dec._buf) < MAX_CHUNK_LINE, len(dec._buf)
        assert dec._trailers <= MAX_TRAILERS - 2, dec._trailers
        if dec.done:
            rest = dec.leftover + b"".join(pieces[i + 1 :])
            return Outcome("done", bytes(got), rest), (offset - len(piece), offset)
        assert dec.leftover == b"", dec.leftover[:40]
    return Outcome("incomplete", bytes(got)), (-1, -1)


def _short(data: bytes) -> bytes:
    return data if len(data) <= 120 else data[:60] + b"..." + data[-60:]


def check_chunked(wire: bytes, cuts: Sequence[int], fast_min: int = FAST_MIN,
                  expect: Outcome | None = None) -> Outcome:
    """The differential check of the module docstring; returns the reference's outcome."""
    ref = reference_decode(wire)
    if expect is not None:
        assert ref == expect, ("reference", _short(wire), ref.kind, expect.kind)
    pieces = split(wire, cuts)
    saved = _transport._FAST_MIN
    _transport._FAST_MIN = fast_min
    try:
        got, (start, stop) = run_decoder(pieces)
    finally:
        _transport._FAST_MIN = saved
    assert got.kind == ref.kind, (_short(wire), len(pieces), fast_min, got.kind, ref.kind)
    assert got.body == ref.body, (_short(wire), len(pieces), fast_min, _short(got.body),
                                  _short(ref.body))
    assert got.leftover == ref.leftover, (_short(wire), len(pieces), fast_min,
                                          _short(got.leftover), _short(ref.leftover))
    if ref.kind == "done":
        end = len(wire) - len(ref.leftover)  # one past the body's last byte
        assert start < end <= stop, (_short(wire), end, start, stop)
    return ref


# -- the generator -----------------------------------------------------------------------------

#: Chunk extensions valid by RFC 9112 (BWS included), among them a quoted ``;``, an HTAB and
#: obs-text in a quoted string.
EXTENSIONS = (b";a", b";name=value", b';q="quo;ted \\" value"', b" ;a=b", b"\t; a = b",
              b";a;b=c;d", b";ieof", b';x=""', b" \t;x", b';x="\ta\xff"')
#: Chunk extensions with a control character (h11 0.16 refuses only the bare LF ones, and
#: `` ;\x0b`` for its space before ``;``).
BAD_EXTENSIONS = (b";a\n", b";\n", b";a=b\nc", b";\x00", b";a=\x00", b";a\r", b";\rx",
                  b";a=b\x7f", b';q="\x1f"', b" ;\x0b", b";a\x0cb", b";\x01", b";a;b\x1b",
                  b"; a\n\r")
TRAILERS = (b"x-t: 1", b'etag: "a"', b"Expires: Wed, 21 Oct 2015 07:28:00 GMT", b"x-empty:",
            b"Server-Timing: db;dur=53", b"x-tab:\ta\tb\t", b"x-obs: caf\xc3\xa9", b"x:",
            b"!#$%&'*+-.^_`|~09azAZ:  v:v ")
#: Trailer lines that are not field lines. h11 0.16 refuses all of them but ``x: \x7f``,
#: ``x: \x01``, ``\n`` (to h11 a bare LF ends the trailer section) and, after another trailer
#: line, the two obs-folds (which it joins to that line).
BAD_TRAILERS = (b"no colon", b"bad trailer\x00", b"x : y", b": y", b"x: a\x00b", b"x: a\nb",
                b"x\x00: y", b"x y: z", b" folded", b"\tx: y", b"x: \x7f", b"x:\r", b"\rX",
                b"x: a\x0bb", b"x: \x01", b"(x): y", b"x-\xff: y", b"\xff", b"\n", b"\r", b":")
DATA_PIECES = (b"\r\n", b"\r", b"\n", b"0\r\n\r\n", b"5\r\nhello\r\n", b"\r\n\r\n", b";",
               b"data: x\n\n", b"\x00", b"\xff", b"HTTP/1.1 200 OK\r\n", b"abc")
EXTRAS = (b"", b"", b"", b"HTTP/1.1 200 OK\r\n\r\n", b"0\r\n\r\n", b"\r\n", b"x")
#: Bytes put where a chunk's CRLF belongs (never CRLF).
NOT_CRLF = (b"XX", b"\n\n", b"\rX", b"\n\r", b"\r\r", b" \r", b"\x00\x00", b"\r ", b"0\r")


def bad_size_lines(digits: bytes) -> list[bytes]:
    """Size lines that must be refused, made from a valid size's ``digits``."""
    long = MAX_CHUNK_LINE - 1 - len(digits)  # with their CRLF: 2 and 1 bytes over the cap
    return [
        b"g" + digits, digits + b"g", b"z", b"G", b"0x" + digits, b"0X" + digits,
        b"-" + digits, b"+" + digits, b" " + digits, b"\t" + digits, digits + b" " + digits,
        digits + b"\x0b", digits + b"\x0c", digits + b"\xa0", digits + b"\x00",
        digits + b"\r", digits + b"\n", b"\n" + digits, b"", b";a=b", b" ;a",
        b"1" + b"0" * 16, b"f" * 17, b"0" * (17 - len(digits)) + digits, b"1_0", b"0_1",
        "\u0665".encode(), "\uff15".encode(), b"garbage" + digits, b"HTTP/1.1 200 OK",
        digits + b";" + b"a" * long, digits + b";" + b"a" * (long - 1),
        b"0" * MAX_CHUNK_LINE, b"0" * (MAX_CHUNK_LINE - 1), digits + b" " * long,
    ]


def _digits(rng: random.Random, size: int) -> bytes:
    digits = f"{size:x}"
    roll = rng.random()
    if roll < 0.25:
        digits = digits.upper()
    elif roll < 0.35:
        digits = "".join(rng.choice((c.lower(), c.upper())) for c in digits)
    if rng.random() < 0.15:
        digits = "0" * rng.randrange(17 - len(digits)) + digits
    return digits.encode()


def _size_line(rng: random.Random, digits: bytes, plain: bool) -> bytes:
    if plain or rng.random() < 0.6:
        return digits
    roll = rng.random()
    if roll < 0.2:
        return digits + rng.choice((b" ", b"\t", b" \t "))  # BWS before the CRLF
    if roll < 0.25:  # an extension up to the longest line (with its CRLF) there may be
        return digits + b";x=" + b"v" * (MAX_CHUNK_LINE - 5 - len(digits) - rng.randrange(3))
    return digits + rng.choice(EXTENSIONS)


_LETTERS = bytes(97 + i % 10 for i in range(256))  # a translate() table onto b"a".."j"


def _data(rng: random.Random, size: int) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return rng.randbytes(size)
    if roll < 0.6:
        return rng.randbytes(size).translate(_LETTERS)
    pool = [*DATA_PIECES, rng.randbytes(3), rng.randbytes(1)]
    out = b""
    while len(out) < size:
        out += b"".join(rng.choices(pool, k=(size - len(out)) // 2 + 1))
    return out[:size]


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(1, 16)
    if roll < 0.9:
        return rng.randint(17, 700)
    return rng.randint(700, 3000)


@dataclass
class Body:
    """A chunked body as parts: chunks (size line, data), the last-chunk line, the trailer
    lines (each without its CRLF), and what the connection carries after the body."""

    chunks: list[tuple[bytes, bytes]]
    last: bytes = b"0"
    trailers: list[bytes] = field(default_factory=list)
    extra: bytes = b""
    after_data: dict[int, bytes] = field(default_factory=dict)  # chunk index -> not CRLF

    def segments(self) -> list[tuple[bytes, bool]]:
        """The wire as (bytes, is chunk data) segments."""
        out: list[tuple[bytes, bool]] = []
        for i, (line, data) in enumerate(self.chunks):
            out += [(line + b"\r\n", False), (data, True),
                    (self.after_data.get(i, b"\r\n"), False)]
        out.append((self.last + b"\r\n" + b"".join(t + b"\r\n" for t in self.trailers)
                    + b"\r\n" + self.extra, False))
        return out

    def wire(self) -> bytes:
        return b"".join(s for s, _ in self.segments())

    def payload(self, chunks: int | None = None) -> bytes:
        return b"".join(data for _, data in self.chunks[:chunks])


def _uniform_chunks(rng: random.Random) -> list[tuple[bytes, bytes]]:
    """A run of chunks with one size line (what ``_uniform_run`` takes), now and then broken:
    a CRLF (or the whole separator) inside the data, one chunk of another size, the same size
    spelled another way (a leading zero, upper case), or a data byte where a CRLF belongs
    (that one via the ``no_crlf_after_data`` maker)."""
    size = rng.choice((32, 33, 100, 255, 256, rng.randint(32, 600)))
    line = f"{size:x}".encode()
    chunks = []
    for i in range(rng.randint(2, 60)):
        data = bytes([97 + (i + j) % 26 for j in range(size)])
        roll = rng.random()
        if roll < 0.02:
            at = rng.randrange(size - 1)
            data = data[:at] + b"\r\n" + data[at + 2:]
        elif roll < 0.03:
            sep = b"\r\n" + line + b"\r\n"
            at = rng.randrange(size - len(sep) + 1)
            data = data[:at] + sep + data[at + len(sep):]
        elif roll < 0.04:
            data = data[:-1] + b"\r" if rng.random() < 0.5 else b"\n" + data[1:]
        elif roll < 0.05:
            data = data[: rng.randrange(1, size)]
        chunks.append((f"{len(data):x}".encode() if len(data) != size else line, data))
        if len(data) == size and rng.random() < 0.02:
            chunks[-1] = (b"0" + line if rng.random() < 0.5 else line.upper(), data)
    return chunks


def random_body(rng: random.Random) -> Body:
    if rng.random() < 0.12:
        return Body(_uniform_chunks(rng), extra=rng.choice(EXTRAS))
    if rng.random() < 0.2:
        # A long run of small plain chunks: what the fast path takes, a CRLF here and there
        # inside the data (which turns it off).
        chunks = []
        for i in range(rng.randint(20, 150)):
            data = bytes([65 + i % 26]) * rng.randint(1, 40)
            if len(data) >= 2 and rng.random() < 0.02:
                data = b"\r\n" + data[2:]
            chunks.append((f"{len(data):x}".encode(), data))
        return Body(chunks, extra=rng.choice(EXTRAS))
    plain = rng.random() < 0.4
    chunks = []
    for _ in range(rng.choice((0, 1, 2, 3, 5, 8, 12))):
        size = _size(rng)
        chunks.append((_size_line(rng, _digits(rng, size), plain), _data(rng, size)))
    last = b"0" * rng.choice((1, 1, 1, 2, 3)) + (b"" if plain or rng.random() < 0.7
                                                   else rng.choice(EXTENSIONS))
    trailers = [] if plain else [rng.choice(TRAILERS) for _ in range(rng.choice((0, 0, 1, 3)))]
    if not plain and rng.random() < 0.05:
        trailers.append(b"x-long: " + b"v" * (MAX_CHUNK_LINE - 10))  # the longest line
    extra = rng.choice(EXTRAS) if rng.random() < 0.9 else rng.randbytes(rng.randrange(40))
    return Body(chunks, last, trailers, extra)


def _bad_size(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    k = rng.randrange(len(body.chunks) + 1)  # k == len: the last-chunk line
    if k < len(body.chunks):
        line = body.chunks[k][0]
        digits = line[: len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))]
        body.chunks[k] = (rng.choice(bad_size_lines(digits or b"5")), body.chunks[k][1])
    else:
        body.last = rng.choice(bad_size_lines(b"0"))
    return body.wire(), Outcome("error", body.payload(k))


def _no_crlf_after_data(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    if not body.chunks:
        body.chunks.append((b"3", b"abc"))
    k = rng.randrange(len(body.chunks))
    body.after_data[k] = rng.choice(NOT_CRLF) if rng.random() < 0.8 else b""
    return body.wire(), Outcome("error", body.payload(k + 1))


def _long_trailer(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    body.trailers.insert(rng.randrange(len(body.trailers) + 1),
                         b"x-long: " + b"v" * (MAX_CHUNK_LINE - 9 + rng.randrange(3)))
    return body.wire(), Outcome("error", body.payload())


def _bad_extension(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    k = rng.randrange(len(body.chunks) + 1)  # k == len: the last-chunk line
    ext = rng.choice(BAD_EXTENSIONS)
    if rng.random() < 0.3:  # after a valid one
        ext = rng.choice(EXTENSIONS) + ext
    if k < len(body.chunks):
        line = body.chunks[k][0].partition(b";")[0]
        body.chunks[k] = (line + ext, body.chunks[k][1])
    else:
        body.last = body.last.partition(b";")[0] + ext
    return body.wire(), Outcome("error", body.payload(k))


def _bad_trailer(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    body.trailers.insert(rng.randrange(len(body.trailers) + 1), rng.choice(BAD_TRAILERS))
    return body.wire(), Outcome("error", body.payload())


def trailer_lines(rng: random.Random, total: int) -> list[bytes]:
    """Valid field lines that make a trailer section of exactly ``total`` bytes (final CRLF
    included; ``total`` is 2 or at least 6), none longer than ``MAX_CHUNK_LINE``: long lines,
    short ones or runs of the shortest."""
    lines = []
    left = total - 2  # always 0 or at least 4
    while left:
        if left <= MAX_CHUNK_LINE and (left < 10 or rng.random() < 0.3):
            size = left
        elif rng.random() < 0.5:
            size = 6
        else:
            size = rng.randint(4, min(MAX_CHUNK_LINE, left - 4))
        lines.append(b"x: y" if size == 6 else b"x:" + b"v" * (size - 4))  # size with CRLF
        left -= size
    return lines


def _trailers_at_the_cap(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    body.trailers = trailer_lines(rng, MAX_TRAILERS - rng.choice((0, 0, 1, 2, 100)))
    return body.wire(), Outcome("done", body.payload(), body.extra)


def _trailers_too_long(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    over = rng.choice((1, 2, 3, 4, rng.randint(5, MAX_TRAILERS)))
    body.trailers = trailer_lines(rng, MAX_TRAILERS + over)
    return body.wire(), Outcome("error", body.payload())


def _huge_size(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    """A size of 16 hex digits that no body reaches: all that follows is chunk data."""
    k = rng.randrange(len(body.chunks) + 1)
    huge = rng.choice((b"f" * 16, b"F" * 16, b"7" + b"f" * 15, b"1" + b"0" * 15))
    if k == len(body.chunks):
        body.chunks.append((huge, b""))
    body.chunks[k] = (huge, body.chunks[k][1])
    wire = body.wire()
    before = b"".join(s for s, _ in body.segments()[: 3 * k])
    return wire, Outcome("incomplete", body.payload(k) + wire[len(before) + len(huge) + 2 :])


def _truncated(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    body.extra = b""
    segments = body.segments()
    wire = b"".join(s for s, _ in segments)
    cut = rng.randrange(len(wire))  # before the final LF
    got = bytearray()
    offset = 0
    for seg, is_data in segments:
        if is_data:
            got += seg[: max(0, cut - offset)]
        offset += len(seg)
    return wire[:cut], Outcome("incomplete", bytes(got))


def _valid(rng: random.Random, body: Body) -> tuple[bytes, Outcome]:
    return body.wire(), Outcome("done", body.payload(), body.extra)


def _mutated(rng: random.Random, body: Body) -> tuple[bytes, Outcome | None]:
    """Random damage; the reference alone says what the result is."""
    wire = bytearray(body.wire())
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        i = rng.randrange(len(wire) + 1)
        if roll < 0.3 and i < len(wire):
            wire[i] = rng.randrange(256)
        elif roll < 0.5:
            wire[i:i] = rng.choice((b"\r\n", b"\r", b"\n", b";", b" ", b"0", b"f", b"x"))
        elif roll < 0.7:
            del wire[i : i + rng.randint(1, 3)]
        elif roll < 0.85:
            wire = bytearray(bytes(wire).replace(b"\r\n", b"\n", rng.randint(1, 3)))
        elif body.chunks:  # a size one off
            k = rng.randrange(len(body.chunks))
            data = body.chunks[k][1]
            body.chunks[k] = (f"{max(len(data) + rng.choice((-1, 1)), 1):x}".encode(), data)
            wire = bytearray(body.wire())
    return bytes(wire), None


PIECES = (b"0", b"1", b"5", b"a", b"F", b"f" * 16, b"1" + b"0" * 16, b"\r\n", b"\r", b"\n",
          b";", b";a=b", b" ", b"\t", b"0x", b"-", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n",
          b"x: y\r\n", b"\x00", b":", b"x:", b"\x7f", b";\n")


def _pieces(rng: random.Random, body: Body | None) -> tuple[bytes, Outcome | None]:
    """Random bytes, or a random sequence of framing-like pieces."""
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(64)), None
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(24))), None


Maker = Callable[[random.Random, Body], tuple[bytes, Outcome | None]]
MAKERS: dict[str, Maker] = {
    "valid": _valid,
    "bad size line": _bad_size,
    "no CRLF after data": _no_crlf_after_data,
    "trailer line too long": _long_trailer,
    "bad chunk extension": _bad_extension,
    "bad trailer line": _bad_trailer,
    "trailer section at the cap": _trailers_at_the_cap,
    "trailer section too long": _trailers_too_long,
    "huge size": _huge_size,
    "truncated": _truncated,
    "mutated": _mutated,
    "pieces": _pieces,
}
WEIGHTS = (26, 12, 8, 2, 4, 4, 2, 2, 2, 10, 20, 8)  # how often each kind comes, in percent


def random_case(rng: random.Random) -> tuple[str, bytes, Outcome | None]:
    """(kind of case, the wire, what it was built to decode to, if known)."""
    (name,) = rng.choices(list(MAKERS), WEIGHTS)
    if name == "pieces":
        wire, expect = _pieces(rng, None)
    else:
        wire, expect = MAKERS[name](rng, random_body(rng))
    return name, wire, expect


def random_cuts(rng: random.Random, wire: bytes) -> list[list[int]]:
    """The feeds to try: whole, a few random pieces, and then cuts around every CRLF, one
    byte at a time or many random pieces (or nothing more)."""
    n = len(wire)
    ways: list[list[int]] = [[]]
    ways.append([rng.randrange(n + 1) for _ in range(rng.randint(1, 8))])
    roll = rng.random()
    if roll < 0.3:
        ways.append([c for m in re.finditer(b"\r\n", wire)
                     for c in (m.start(), m.start() + 1, m.end())])
    elif roll < 0.4 and n <= 3000:
        ways.append(list(range(n)))
    elif roll < 0.7:
        ways.append([rng.randrange(n + 1) for _ in range(n // rng.randint(2, 40))])
    return ways


# -- the seeded loop ---------------------------------------------------------------------------

N = 2500
SEED = 0x6B7463


def test_random_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """``N`` seeded cases, each fed in two to three ways, with and without an early fast path;
    the first failing one is reported with its index. The tallies check that the generator
    reaches what it is meant to: every kind of case, every outcome, the fast path taking runs
    of chunks and giving up."""
    fast: Counter[str] = Counter()
    fast_path = _ChunkedDecoder._fast_path

    def counting(self: _ChunkedDecoder, data: bytes, out: list[bytes]) -> int:
        taken = fast_path(self, data, out)
        fast["took" if taken else "gave up" if not self._fast else "too short"] += 1
        return taken

    uniform_run = _ChunkedDecoder._uniform_run

    def counting_runs(data: bytes, out: list[bytes]) -> int:
        taken = uniform_run(data, out)
        fast["uniform run"] += taken > 0
        return taken

    monkeypatch.setattr(_ChunkedDecoder, "_fast_path", counting)
    monkeypatch.setattr(_ChunkedDecoder, "_uniform_run", staticmethod(counting_runs))
    rng = random.Random(SEED)
    cases: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    start_time = time.perf_counter()
    for i in range(N):
        state = rng.getstate()
        try:
            name, wire, expect = random_case(rng)
            fast_min = rng.choice((0, FAST_MIN))
            for cuts in random_cuts(rng, wire):
                ref = check_chunked(wire, cuts, fast_min, expect)
        except Exception as exc:
            rng.setstate(state)
            raise AssertionError(f"case {i} (seed {SEED:#x}) failed: {exc!r}") from exc
        cases[name] += 1
        outcomes[ref.kind] += 1
    elapsed = time.perf_counter() - start_time
    print(f"\nchunked: {N} cases in {elapsed:.1f} s; {dict(outcomes)}; fast path {dict(fast)}")
    assert set(cases) == set(MAKERS), cases
    assert min(outcomes[k] for k in ("done", "error", "incomplete")) >= N // 10, outcomes
    assert fast["took"] >= N // 5 and fast["gave up"] >= N // 10, fast
    assert fast["uniform run"] >= N // 20, fast


# -- the reference itself, on cases written out by hand ----------------------------------------

E, D, INC = "error", "done", "incomplete"


@pytest.mark.parametrize(("wire", "expect"), [
    (b"0\r\n\r\n", Outcome(D, b"")),
    (b"5\r\nhello\r\n0\r\n\r\nNEXT", Outcome(D, b"hello", b"NEXT")),
    (b"5;a=b\r\nhello\r\n000;x\r\nx-t: 1\r\n\r\n", Outcome(D, b"hello")),
    (b"5 \t;a\r\nhello\r\n0 \r\n\r\n", Outcome(D, b"hello")),  # BWS
    (b"A\r\n0123456789\r\n0\r\n\r\n", Outcome(D, b"0123456789")),
    (b"2\r\n\r\n\r\n0\r\n\r\n", Outcome(D, b"\r\n")),
    (b"000000000000000a\r\n0123456789\r\n0\r\n\r\n", Outcome(D, b"0123456789")),
    (b"5;x\nfoo\r\nhello\r\n0\r\n\r\n", Outcome(E, b"")),  # a bare LF in the ext (h11: too)
    (b"0\r\nbad trailer\x00\r\n\r\n", Outcome(E, b"")),  # not a field line (h11: too)
    (b"5;a=\x00\r\nhello\r\n0\r\n\r\n", Outcome(E, b"")),  # NUL in the ext
    (b"5\r\nhello\r\n0;\x7f\r\n\r\n", Outcome(E, b"hello")),  # DEL in the last-chunk's ext
    (b"5;a\r\r\nhello\r\n0\r\n\r\n", Outcome(E, b"")),  # a bare CR in the ext
    (b'5;q="\ta\xff" \t\r\nhello\r\n0;a\t\r\n\r\n', Outcome(D, b"hello")),  # HTAB, obs-text
    (b"5;a\n", Outcome(INC, b"")),  # the fault counts at the end of the line
    (b"0\r\nx-t: 1\r\netag: \"a\"\r\nx:\r\nx-o: \xc3\xa9\t;\r\n\r\n", Outcome(D, b"")),
    (b"0\r\nnocolon\r\n\r\n", Outcome(E, b"")),
    (b"0\r\nx : y\r\n\r\n", Outcome(E, b"")),  # no space before the colon
    (b"0\r\n: y\r\n\r\n", Outcome(E, b"")),  # no name
    (b"0\r\nx: a\nb: c\r\n\r\n", Outcome(E, b"")),  # a bare LF (h11: "b: c" is a line)
    (b"0\r\nx: y\r\n folded\r\n\r\n", Outcome(E, b"")),  # obs-fold (h11 joins it)
    (b"0\r\nx: \x01\r\n\r\n", Outcome(E, b"")),  # a control character (h11 takes it)
    (b"0\r\nbad", Outcome(INC, b"")),  # not a fault before the end of the line
    (b"0000000000000000a\r\nx", Outcome(E, b"")),  # 17 digits
    (b"ffffffffffffffff\r\nabc", Outcome(INC, b"abc")),  # 16 digits: fine, and never ends
    (b"0x5\r\nhello\r\n", Outcome(E, b"")),
    (b"-5\r\nhello\r\n", Outcome(E, b"")),
    (b"+5\r\nhello\r\n", Outcome(E, b"")),
    (b" 5\r\nhello\r\n", Outcome(E, b"")),
    (b"5 5\r\nhello\r\n", Outcome(E, b"")),
    (b"1_0\r\n", Outcome(E, b"")),
    (b"\r\n", Outcome(E, b"")),
    (b"5\nhello\n0\n\n", Outcome(INC, b"")),  # no CRLF yet: the size line goes on
    (b"5\r\nhelloXX", Outcome(E, b"hello")),
    (b"5\r\nhelloX", Outcome(INC, b"hello")),  # one byte after the data decides nothing
    (b"5\r\nhel", Outcome(INC, b"hel")),
    (b"5\r\nhello\r\n3\r\nabc\r\nzz\r\n", Outcome(E, b"helloabc")),
    (b"5\r\nhello\r\n0\r\n\r", Outcome(INC, b"hello")),
    (b"5\r\nhello\r\n0\r\n\rX\r\n\r\n", Outcome(E, b"hello")),  # "\rX": not a field line
    (b"1;" + b"a" * (MAX_CHUNK_LINE - 4) + b"\r\nx\r\n0\r\n\r\n", Outcome(D, b"x")),
    (b"1;" + b"a" * (MAX_CHUNK_LINE - 3) + b"\r\nx\r\n0\r\n\r\n", Outcome(E, b"")),
    (b"1;" + b"a" * (MAX_CHUNK_LINE - 3), Outcome(INC, b"")),  # the cap is not reached yet
    (b"1;" + b"a" * (MAX_CHUNK_LINE - 2), Outcome(E, b"")),
    (b"0\r\n" + b"t" * MAX_CHUNK_LINE, Outcome(E, b"")),
    # The trailer section: at most MAX_TRAILERS bytes, its final CRLF included.
    (b"0\r\n" + b"x: y\r\n" * 5000, Outcome(E, b"")),  # trailer lines without end
    (b"0\r\n" + b"x: y\r\n" * 5000 + b"\r\n", Outcome(E, b"")),
    (b"0\r\n" + b"x: y\r\n" * 2730, Outcome(INC, b"")),  # 16,380 bytes: room for the end
    (b"0\r\n" + b"x: y\r\n" * 2730 + b"\r\n", Outcome(D, b"")),
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyy\r\n\r\n", Outcome(D, b"")),  # 16,384 bytes
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyyy\r\n\r\n", Outcome(E, b"")),  # 16,385
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyyy\r\n", Outcome(E, b"")),  # no room left
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyy\r\n\r", Outcome(INC, b"")),
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyy\r\na", Outcome(INC, b"")),
    (b"0\r\n" + b"x: y\r\n" * 2729 + b"x: yyy\r\nab", Outcome(E, b"")),  # 16,384, no end
    (b"0\r\n" + (b"x:" + b"v" * (MAX_CHUNK_LINE - 4) + b"\r\n") * 3
     + b"x:" + b"v" * (MAX_CHUNK_LINE - 6) + b"\r\n\r\nNEXT", Outcome(D, b"", b"NEXT")),
    (b"0\r\n" + (b"x:" + b"v" * (MAX_CHUNK_LINE - 4) + b"\r\n") * 4 + b"\r\n", Outcome(E, b"")),
])
def test_reference_and_decoder_on_written_cases(wire: bytes, expect: Outcome) -> None:
    assert reference_decode(wire) == expect
    for cuts in ([], list(range(len(wire)))):
        for fast_min in (0, FAST_MIN):
            check_chunked(wire, cuts, fast_min, expect)


@pytest.mark.parametrize("digits", [b"5", b"0", b"00ff", b"F" * 16])
def test_every_bad_size_line_is_refused(digits: bytes) -> None:
    for line in bad_size_lines(digits):
        wire = b"2\r\nab\r\n" + line + b"\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n"
        check_chunked(wire, [], FAST_MIN, Outcome(E, b"ab"))
        check_chunked(wire, [3, 7, 8, 9], 0, Outcome(E, b"ab"))


# -- the equal-size run path, on the inputs each of its checks alone stands against ------------

_RUN_DATA = bytes(range(97, 97 + 25)) * 4  # 100 bytes, no CR or LF


def _run_wire(*frames: bytes) -> bytes:
    return b"".join(frames) + b"0\r\n\r\n"


@pytest.mark.parametrize("wire", [
    # A chunk's data ends in CRLF and the size line: the separator can then be matched one
    # CRLF early, which keeps the length right and swaps bytes (the CRLF count catches it).
    _run_wire(b"64\r\n" + _RUN_DATA[:96] + b"\r\n64\r\n", b"64\r\n" + _RUN_DATA + b"\r\n",
              b"64\r\n" + _RUN_DATA + b"\r\n"),
    # The same, and the next size line ends without its CRLF: the CRLF count then comes out
    # right too, and only the per-frame check of the size lines refuses it.
    _run_wire(b"64\r\n" + _RUN_DATA[:96] + b"\r\n64\r\n", b"64zz" + _RUN_DATA + b"\r\n",
              b"64\r\n" + _RUN_DATA + b"\r\n"),
    # The separator itself inside a chunk's data (the length check).
    _run_wire(b"64\r\n" + _RUN_DATA[:40] + b"\r\n64\r\n" + _RUN_DATA[46:] + b"\r\n",
              b"64\r\n" + _RUN_DATA + b"\r\n", b"64\r\n" + _RUN_DATA + b"\r\n"),
    # A data byte where the CRLF after a chunk belongs (the strided CRLF checks).
    _run_wire(b"64\r\n" + _RUN_DATA + b"\r\n", b"64\r\n" + _RUN_DATA + b"\rx",
              b"64\r\n" + _RUN_DATA + b"\r\n"),
    # One size line spelled another way, the same value (per frame, again).
    _run_wire(b"64\r\n" + _RUN_DATA + b"\r\n", b"064\r\n" + _RUN_DATA + b"\r\n",
              b"64\r\n" + _RUN_DATA + b"\r\n"),
    _run_wire(*[b"64\r\n" + _RUN_DATA + b"\r\n"] * 5),
])
def test_uniform_run_agrees_with_the_reference(wire: bytes) -> None:
    taken: list[int] = []
    out: list[bytes] = []
    taken.append(_ChunkedDecoder._uniform_run(wire, out))
    for fast_min in (0, FAST_MIN):
        check_chunked(wire, [], fast_min)
    if taken[0]:  # what it took is exactly the reference's body for those bytes
        assert out == [reference_decode(wire[:taken[0]] + b"0\r\n\r\n").body]


# -- regressions found by this fuzzing ---------------------------------------------------------


def test_regression_bytes_decoded_before_a_framing_error_are_kept() -> None:
    """A read holding whole chunks and then a malformed size line (or a chunk without its
    CRLF) raised before returning the chunks it had decoded: the stream lost them, though the
    same bytes fed one at a time came out. ``partial`` now holds them."""
    for wire, before in ((b"5\r\nhello\r\n5\r\nworld\r\nzz\r\n", b"helloworld"),
                         (b"5\r\nhello\r\n5\r\nworldXX", b"helloworld"),
                         (b"5\r\nhello\r\n" + b"1" * MAX_CHUNK_LINE, b"hello")):
        dec = _ChunkedDecoder()
        with pytest.raises(httpx.RemoteProtocolError):
            dec.feed(wire)
        assert dec.partial == before
        check_chunked(wire, [], FAST_MIN, Outcome(E, before))


async def test_regression_transport_yields_the_chunks_before_a_framing_error(
    nursery: trio.Nursery,
) -> None:
    """Through the transport: the chunks of a read that ends in a malformed chunk size come
    out before ``RemoteProtocolError`` (the module docstring's promise)."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n5\r\nworld\r\nzz\r\n")
        await stream.aclose()

    server = await start(nursery, handler)
    got = await body_until_error(server.port, "malformed chunk size")
    assert got == b"helloworld"
