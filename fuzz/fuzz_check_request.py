"""atheris harness: ``check_request`` on any method, target and headers: only
``RequestRejected``, and whatever passes is consistent (``checks.check_request_contract``)."""

from __future__ import annotations

from _harness import atheris, checks, fuzz
from fuzz_headers import headers

METHODS = ("GET", "POST", "CONNECT", "connect", "OPTIONS", "PUT", "")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = METHODS[fdp.ConsumeIntInRange(0, len(METHODS) - 1)]
    target = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 48))
    checks.check_request_contract(method, target, headers(fdp))


if __name__ == "__main__":
    fuzz(one_input)
