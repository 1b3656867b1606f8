"""atheris harness: ``normalize_path`` + ``match_route`` + ``build_upstream_url`` on any path
and query (``checks.check_url``), and ``parse_upstream`` on any string (``check_upstream``)."""

from __future__ import annotations

from _harness import atheris, checks, fuzz


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 9) == 0:
        checks.check_upstream(fdp.ConsumeUnicodeNoSurrogates(64))
        return
    upstream = checks.UPSTREAMS[fdp.ConsumeIntInRange(0, len(checks.UPSTREAMS) - 1)]
    prefix = checks.PREFIXES[fdp.ConsumeIntInRange(0, len(checks.PREFIXES) - 1)]
    query = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    lead = (b"", b"/", b"/v1/", b"/plain", b"/a/b/")[fdp.ConsumeIntInRange(0, 4)]
    checks.check_url(lead + fdp.ConsumeBytes(fdp.remaining_bytes()), upstream, prefix, query)


if __name__ == "__main__":
    fuzz(one_input)
