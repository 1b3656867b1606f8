"""atheris harness: ``filter_request_headers`` / ``filter_response_headers`` on any header list
(``checks.check_headers``). Names and values are drawn from the hop-by-hop vocabulary or raw."""

from __future__ import annotations

from _harness import atheris, checks, fuzz


def headers(fdp: atheris.FuzzedDataProvider) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        if fdp.ConsumeBool():
            name = checks.HEADER_NAMES[fdp.ConsumeIntInRange(0, len(checks.HEADER_NAMES) - 1)]
        else:
            name = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
        if fdp.ConsumeBool():
            value = checks.HEADER_VALUES[
                fdp.ConsumeIntInRange(0, len(checks.HEADER_VALUES) - 1)]
        else:
            value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
        out.append((name, value))
    return out


def one_input(data: bytes) -> None:
    checks.check_headers(headers(atheris.FuzzedDataProvider(data)))


if __name__ == "__main__":
    fuzz(one_input)
