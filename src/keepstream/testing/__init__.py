"""keepstream.testing: a fault-injection toolkit for your own pytest-trio suites.

* :func:`run_fake_upstream` / :class:`FakeUpstream`: a scriptable HTTP/1.1 origin on loopback
  whose faults are chosen per request with ``X-Fake-*`` headers, recording what it sent.
* :func:`run_fault_proxy` / :class:`FaultProxy`: a TCP proxy with Toxiproxy's toxics.
* :func:`chaos_request`: a raw HTTP client that misbehaves on purpose.
* :func:`run_canary` / :class:`Canary`: a loopback listener nothing may reach (SSRF, redirects).
* :func:`run_keepstream`: keepstream in-process on a loopback port.
* :func:`run_keepstream_process` / :func:`start_keepstream_process`: ``keepstream serve`` as a
  subprocess on a loopback port, to send it real signals (:class:`KeepstreamProcess`).

The pytest plugin (auto-loaded when keepstream is installed, through the ``pytest11`` entry
point named ``keepstream``; with auto-loading disabled, ``pytest -p trio -p keepstream``, or
``-p keepstream.testing``) exposes these as fixtures: ``fake_upstream``,
``fault_proxy_factory``, ``keepstream_factory``, ``keepstream_process_factory``,
``keepstream_journal_url``, ``canary``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._canary import Canary, run_canary
from ._client import ChaosResult, chaos_request
from ._faultproxy import FaultProxy, Toxic, run_fault_proxy
from ._harness import RunningKeepstream, run_keepstream
from ._process import KeepstreamProcess, run_keepstream_process, start_keepstream_process
from ._upstream import FakeResponseSpec, FakeUpstream, UpstreamExchange, run_fake_upstream, sse_body

if TYPE_CHECKING:
    import pytest

__all__ = [
    "Canary",
    "ChaosResult",
    "FakeResponseSpec",
    "FakeUpstream",
    "FaultProxy",
    "KeepstreamProcess",
    "RunningKeepstream",
    "Toxic",
    "UpstreamExchange",
    "chaos_request",
    "run_canary",
    "run_fake_upstream",
    "run_fault_proxy",
    "run_keepstream",
    "run_keepstream_process",
    "sse_body",
    "start_keepstream_process",
]


def pytest_configure(config: pytest.Config) -> None:
    """pytest hook, for ``-p keepstream.testing`` (this module named as a plugin).

    Registers the fixtures' plugin (``keepstream.testing._plugin``) under its entry-point name
    ``keepstream`` unless a plugin of that name is registered already (auto-loaded, or named with
    ``-p keepstream``) or blocked (``-p no:keepstream``). So ``-p keepstream.testing`` gives the
    fixtures with plugin auto-loading disabled too, and never registers them twice.
    """
    manager = config.pluginmanager
    if manager.has_plugin("keepstream") or manager.is_blocked("keepstream"):
        return
    from . import _plugin

    if not manager.is_registered(_plugin):  # e.g. named by its module path, too
        manager.register(_plugin, "keepstream")
