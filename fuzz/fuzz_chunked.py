"""atheris harness: the chunked decoder (``_ChunkedDecoder``) against the reference decoder of
``tests/test_transport_fuzz.py``, on any bytes in any feeds (``checks.check_chunked``).

The first byte picks the input: the bytes as they are; a sequence of framing-like pieces; one
piece of up to 8 bytes repeated up to 6000 times between a head and a tail (so that lines over
the ``MAX_CHUNK_LINE`` cap, and trailer sections of short field lines such as ``x:\r\n`` over
the ``MAX_TRAILERS`` cap, are reachable); or a case of the test suite's generator (a valid body,
a fault in chunk k, a bad chunk extension or trailer line, a trailer section at or over its cap,
a truncation, random damage) from a fuzzer-chosen seed, with the outcome it was built for
checked too. The fuzzer also picks the cuts (one byte per feed one time in
eight) and whether the fast path is tried after every chunk's end.
"""

from __future__ import annotations

import random

from _harness import atheris, fuzz  # first: it instruments keepstream
from tests import test_transport_fuzz as checks

PIECES = checks.PIECES


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    fast_min = 0 if fdp.ConsumeBool() else checks.FAST_MIN
    one_byte_feeds = fdp.ConsumeIntInRange(0, 7) == 0
    cuts = [fdp.ConsumeIntInRange(0, 8192) for _ in range(fdp.ConsumeIntInRange(0, 12))]
    expect: checks.Outcome | None = None
    if mode == 0:
        wire = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 1:
        parts = []
        for _ in range(fdp.ConsumeIntInRange(0, 48)):
            if fdp.ConsumeIntInRange(0, 3):
                parts.append(PIECES[fdp.ConsumeIntInRange(0, len(PIECES) - 1)])
            else:
                parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4)))
        wire = b"".join(parts)
    elif mode == 2:
        head = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
        token = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        count = fdp.ConsumeIntInRange(0, 6000)
        wire = head + token * count + fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        _, wire, expect = checks.random_case(random.Random(fdp.ConsumeInt(4)))
    if one_byte_feeds:
        cuts = list(range(min(len(wire), 8192)))
    checks.check_chunked(wire, cuts, fast_min, expect)


if __name__ == "__main__":
    fuzz(one_input)
