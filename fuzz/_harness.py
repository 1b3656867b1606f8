"""Shared set-up of the atheris harnesses: instrument keepstream, then load the checks.

The checks are the ``check_*`` functions of ``tests/test_fuzz.py``, so a harness and the test
suite assert one contract. Run a harness from anywhere: ``python fuzz/fuzz_sse.py -runs=100000``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["keepstream"]):
    import keepstream._rules
    import keepstream._sse  # noqa: F401 - imported here to be instrumented

from tests import test_fuzz as checks  # noqa: E402 - after the instrumented imports

__all__ = ["atheris", "checks", "fuzz"]


def fuzz(one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer on ``one_input`` with the command line's options (``-runs=``, ...)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
