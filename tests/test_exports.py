"""The public API: what ``keepstream`` and ``keepstream.testing`` export (as trio's own
``test_exports.py`` checks its namespace).

Every name in ``__all__`` exists and imports; nothing private is exported (``__version__``
aside); every public class, function and method has a docstring of its own (not the
signature a dataclass generates); the names DESIGN section 4 promises are there; importing
opens nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import importlib.resources
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import keepstream
import keepstream.testing

MODULES = [keepstream, keepstream.testing]

#: Promised by DESIGN section 4 (Library) and the toolkit's docs.
DOCUMENTED = {
    keepstream: {"Config", "open_proxy", "Proxy", "StreamHandle", "create_app", "serve",
                 "RequestRejected", "StreamRefused", "ProxyError", "KeepstreamError",
                 "ConfigError", "JournalError", "Route", "ServerConfig", "JournalConfig",
                 "Status"},
    keepstream.testing: {"run_fake_upstream", "FakeUpstream", "FakeResponseSpec",
                         "run_keepstream", "RunningKeepstream", "chaos_request",
                         "run_fault_proxy", "FaultProxy", "run_canary", "Canary",
                         "run_keepstream_process", "start_keepstream_process",
                         "KeepstreamProcess"},
}


def _exported(module: ModuleType) -> list[tuple[str, object]]:
    return [(name, getattr(module, name)) for name in module.__all__]


def _own_doc(obj: object) -> str:
    """The docstring written for ``obj``: "" for none, or for what dataclass/enum generate."""
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    doc = (doc or "").strip()
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and \
            doc.startswith(f"{obj.__name__}("):
        return ""  # the signature dataclasses put in when the class has no docstring
    if inspect.isclass(obj) and issubclass(obj, enum.Enum) and \
            doc in ("An enumeration.", ""):
        return ""
    return doc


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_names_exist_and_import(module: ModuleType) -> None:
    assert len(module.__all__) == len(set(module.__all__)), "duplicates in __all__"
    fresh = importlib.import_module(module.__name__)
    for name in module.__all__:
        assert hasattr(fresh, name), f"{module.__name__}.{name} is in __all__ but missing"
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import {name}", namespace)
        assert namespace[name] is getattr(module, name)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_nothing_private_exported(module: ModuleType) -> None:
    private = [n for n in module.__all__ if n.startswith("_") and n != "__version__"]
    assert private == []
    for name, obj in _exported(module):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            # Defined in the package, so the public name is the re-export of a private module.
            assert obj.__module__.startswith("keepstream"), (name, obj.__module__)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_documented_names_exported(module: ModuleType) -> None:
    assert DOCUMENTED[module] <= set(module.__all__)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_names_have_docstrings(module: ModuleType) -> None:
    """Every public class, function, method and property has its own docstring."""
    missing: list[str] = []
    for name, obj in _exported(module):
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        if not _own_doc(obj):
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            target = member.fget if isinstance(member, property) else \
                getattr(member, "__func__", member)
            if (isinstance(member, property) or inspect.isfunction(target)) and \
                    not (getattr(target, "__doc__", None) or "").strip():
                missing.append(f"{name}.{attr}")
    assert missing == [], f"no docstring: {missing}"


def test_version_matches_the_distribution() -> None:
    assert isinstance(keepstream.__version__, str)
    assert keepstream.__version__ == importlib.metadata.version("keepstream")


def test_py_typed_is_shipped() -> None:
    assert importlib.resources.files("keepstream").joinpath("py.typed").is_file()


def test_import_opens_nothing(tmp_path: Path) -> None:
    """I7: importing keepstream, its toolkit and the Hypercorn entry point creates no journal
    file and starts no thread, and needs no ``KEEPSTREAM_CONFIG``."""
    code = (
        "import os, threading\n"
        "os.environ.pop('KEEPSTREAM_CONFIG', None)\n"
        "import keepstream, keepstream.testing, keepstream.asgi\n"
        "assert callable(keepstream.asgi.app)\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []
