"""pytest plugin: keepstream.testing's helpers as fixtures (entry point ``pytest11``).

Fixtures (all need pytest-trio; each binds 127.0.0.1 only and stops with the test):

* ``fake_upstream``: a running :class:`~keepstream.testing.FakeUpstream`.
* ``keepstream_factory``: ``async with keepstream_factory(config) as ks`` runs keepstream
  in-process on a loopback port (a :class:`~keepstream.testing.RunningKeepstream`).
* ``fault_proxy_factory``: ``await fault_proxy_factory(port)`` starts a
  :class:`~keepstream.testing.FaultProxy` in front of a port.
* ``keepstream_process_factory``: ``async with keepstream_process_factory(config) as ks`` runs
  ``keepstream serve`` as a subprocess (a :class:`~keepstream.testing.KeepstreamProcess`) in the
  test's temporary directory; send it signals with ``ks.send_signal``.
* ``keepstream_journal_url``: a ``sqlite:///`` URL in the test's temporary directory.
* ``canary``: a running :class:`~keepstream.testing.Canary`, a loopback listener that counts the
  connections it gets (there must be none).

Registered under the name ``keepstream``: by the entry point, by ``-p keepstream``, or by
``-p keepstream.testing`` (see :func:`keepstream.testing.pytest_configure`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path

import pytest
import trio

from .._config import Config
from ._canary import Canary, run_canary
from ._faultproxy import FaultProxy, run_fault_proxy
from ._harness import RunningKeepstream, run_keepstream
from ._process import KeepstreamProcess, run_keepstream_process
from ._upstream import FakeUpstream, run_fake_upstream


@pytest.fixture
async def fake_upstream(nursery: trio.Nursery) -> FakeUpstream:
    upstream: FakeUpstream = await nursery.start(run_fake_upstream)
    return upstream


@pytest.fixture
async def canary(nursery: trio.Nursery) -> Canary:
    found: Canary = await nursery.start(run_canary)
    return found


@pytest.fixture
def keepstream_journal_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'journal.db'}"


@pytest.fixture
def keepstream_factory() -> Callable[[Config], AbstractAsyncContextManager[RunningKeepstream]]:
    return run_keepstream


@pytest.fixture
async def fault_proxy_factory(
    nursery: trio.Nursery,
) -> Callable[[int], Awaitable[FaultProxy]]:
    async def start(port: int, host: str = "127.0.0.1") -> FaultProxy:
        proxy: FaultProxy = await nursery.start(partial(run_fault_proxy, host, port))
        return proxy

    return start


@pytest.fixture
def keepstream_process_factory(
    tmp_path: Path,
) -> Callable[..., AbstractAsyncContextManager[KeepstreamProcess]]:
    return partial(run_keepstream_process, workdir=tmp_path)
