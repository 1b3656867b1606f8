"""Acceptance: ``pip install keepstream`` (without the ``test`` extra), then pytest usage works.

In a fresh virtual environment: keepstream is installed from a copy of this checkout (what
``pip install keepstream`` installs, built the same way), then ``pytest`` and ``pytest-trio``
on their own. ``examples/test_my_service.py`` is copied into an empty directory, with no
configuration next to it, and run there: the plugin must load through its ``pytest11`` entry
point and the example, which uses only the public fixtures, must pass; and again with plugin
auto-loading disabled and the plugins named explicitly (``-p trio -p keepstream``).

This needs the package index (as installing keepstream does); it is not skipped offline.
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
    # named with -p by their entry-point names, and the same tests pass.
    explicit = await _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "trio",
                          "-p", "keepstream", EXAMPLE.name, cwd=work, timeout=300,
                          extra_env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert explicit.strip().splitlines()[-1].split(" in ")[0] == summary.split(" in ")[0], \
        explicit
