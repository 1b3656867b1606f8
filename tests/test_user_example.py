"""Acceptance: ``pip install keepstream`` (without the ``test`` extra), then pytest usage works.

In a fresh virtual environment: keepstream is installed from a copy of this checkout (what
``pip install keepstream`` installs, built the same way), then ``pytest`` and ``pytest-trio``
on their own. ``examples/test_my_service.py`` is copied into an empty directory, with no
configuration next to it, and run there: the plugin must load through its ``pytest11`` entry
point and the example, which uses only the public fixtures, must pass; and again with plugin
auto-loading disabled and the plugins named explicitly (``-p trio -p keepstream``, and
``-p trio -p keepstream.testing``), and auto-loaded with ``-p keepstream.testing`` named as well.

This needs the package index (as installing keepstream does); it is not skipped offline. The
plugin-naming cases also run, fast, with this interpreter's keepstream (not marked slow).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "test_my_service.py"


async def _run(*argv: str | Path, cwd: Path, timeout: float,
               extra_env: dict[str, str] | None = None) -> str:
    """Run a command with a clean environment (plus ``extra_env``); return its output, fail
    with it on error."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                        "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra_env or {})
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [str(a) for a in argv], cwd=cwd, env=env, check=False,
            capture_stdout=True, capture_stderr=True,
        )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{out}"
    return out


def _copy_project(dest: Path) -> Path:
    """The files a build of keepstream reads, without build or cache debris."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for extra in ROOT.glob("LICENSE*"):
        shutil.copy2(extra, dest / extra.name)
    shutil.copytree(ROOT / "src", dest / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


@pytest.mark.slow
async def test_pip_install_then_the_example_passes_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    project = _copy_project(tmp_path / "keepstream-src")
    work = tmp_path / "my-service-tests"
    work.mkdir()
    shutil.copy2(EXAMPLE, work / EXAMPLE.name)

    await _run(sys.executable, "-m", "venv", venv, cwd=tmp_path, timeout=120)
    pip = (python, "-m", "pip", "--disable-pip-version-check", "--no-input")
    await _run(*pip, "install", "-q", project, cwd=tmp_path, timeout=300)
    await _run(*pip, "install", "-q", "pytest", "pytest-trio", cwd=tmp_path, timeout=300)

    # The installed package is the one used, and the test extra is not installed.
    where = await _run(python, "-c", "import keepstream, importlib.util as u; "
                       "print(keepstream.__file__); print(u.find_spec('hypothesis'))",
                       cwd=work, timeout=60)
    location, hypothesis = where.split()[:2]
    assert Path(location).is_relative_to(venv), location
    assert hypothesis == "None"

    out = await _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", EXAMPLE.name,
                     cwd=work, timeout=300)
    # Exit status 0: nothing failed or errored. And every test ran: none skipped or deselected.
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in [\d.]+s( \(.*\))?", summary), out

    # Explicit use, with plugin auto-loading off (as some CI setups run pytest): the plugins are
    # named with -p, by their entry-point names or by the toolkit's module, and the same tests
    # pass; naming the module while the plugin auto-loads changes nothing either.
    for autoload, plugins in EXPLICIT:
        explicit = await _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins,
                              EXAMPLE.name, cwd=work, timeout=300,
                              extra_env={} if autoload else {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        assert explicit.strip().splitlines()[-1].split(" in ")[0] == summary.split(" in ")[0], \
            (plugins, explicit)


#: (auto-loading on, the -p options): ways to name the plugin that must all give its fixtures.
EXPLICIT: list[tuple[bool, tuple[str, ...]]] = [
    (False, ("-p", "trio", "-p", "keepstream")),
    (False, ("-p", "trio", "-p", "keepstream.testing")),
    (True, ("-p", "keepstream.testing")),
]

PROBE = """\
import pytest

import keepstream.testing._plugin

pytestmark = pytest.mark.trio


async def test_fixtures(request, fake_upstream, canary, keepstream_journal_url):
    assert request.config.pluginmanager.get_plugin("keepstream") is keepstream.testing._plugin
    assert fake_upstream.port > 0 and canary.port > 0 and canary.connections == 0
    assert keepstream_journal_url.startswith("sqlite:///")
"""


@pytest.mark.parametrize(("autoload", "plugins"), EXPLICIT,
                         ids=["-p keepstream", "-p keepstream.testing", "autoload+module"])
async def test_plugin_loads_by_either_name(
    tmp_path: Path, autoload: bool, plugins: tuple[str, ...]
) -> None:
    """This interpreter's keepstream: each way of naming the plugin gives its fixtures once,
    with no warning (a second registration of the same module would be an error)."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    out = await _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     "-W", "error", *plugins, "test_probe.py", cwd=tmp_path, timeout=120,
                     extra_env={} if autoload else {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert re.fullmatch(r"1 passed in [\d.]+s( \(.*\))?", out.strip().splitlines()[-1]), out


async def test_without_the_plugin_named_the_fixtures_are_missing(tmp_path: Path) -> None:
    """The control for the test above: auto-loading off and only ``-p trio``."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    with trio.fail_after(120):
        proc = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "trio",
             "test_probe.py"], cwd=tmp_path, check=False, capture_stdout=True,
            env={**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 1, proc.stdout.decode(errors="replace")
    assert b"fixture 'fake_upstream' not found" in proc.stdout
