"""atheris harness: ``SSEParser`` on any bytes in any chunking (``checks.check_sse``).

Part of the inputs are built as ``head + token * count + tail`` (``count`` up to 6000) so that
long runs (a line of thousands of digits, a line over a small cap) are reachable at all.
"""

from __future__ import annotations

from _harness import atheris, checks, fuzz


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    caps = checks.SSE_CAPS[fdp.ConsumeIntInRange(0, len(checks.SSE_CAPS) - 1)]
    cuts = [fdp.ConsumeIntInRange(0, 512) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    one_byte_feeds = fdp.ConsumeIntInRange(0, 15) == 0
    if fdp.ConsumeBool():
        head = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        token = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 3))
        count = fdp.ConsumeIntInRange(0, 6000)
        stream = head + token * count + fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if one_byte_feeds:
        cuts = list(range(min(len(stream), 2048)))
    checks.check_sse(stream, cuts, *caps)


if __name__ == "__main__":
    fuzz(one_input)
