"""Run ``keepstream serve`` as a subprocess and send it signals (deploys, Ctrl-C, SIGKILL).

The in-process harness (:func:`~keepstream.testing.run_keepstream`) cannot show what a real
process does on SIGTERM: exit code, drain deadline, the records a SIGKILL leaves. This one runs
the same command users deploy, on 127.0.0.1 with an ephemeral port, and hands back the process:
from a :class:`~keepstream.Config` or a TOML file (``--config``), or from plain command-line
flags alone (``config=None``: ``keepstream serve --bind 127.0.0.1:0 --upstream URL ...``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .._config import Config

LISTENING = "keepstream listening on http://"


@dataclass
class KeepstreamProcess:
    """A running ``keepstream serve`` subprocess listening on ``127.0.0.1:port``.

    ``started`` is ``trio.current_time()`` when its "listening" line arrived; ``stderr_path``
    holds everything it wrote to stderr.
    """

    proc: trio.Process
    port: int
    url: str
    stderr_path: Path
    started: float

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGTERM by default, as a deploy does) if the process still runs."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a platform does when the grace period is over."""
        if self.proc.returncode is None:
            self.proc.kill()

    async def wait(self) -> int:
        """Wait for the process to exit; return its exit code (negative: killed by a signal)."""
        return await self.proc.wait()

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.proc.returncode

    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for every str keepstream accepts
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_toml(config: Config) -> str:
    """``config`` as the TOML text ``keepstream serve --config`` reads."""
    lines = ["[server]"]
    lines += [f"{f.name} = {_toml_value(getattr(config.server, f.name))}"
              for f in dataclasses.fields(config.server)]
    lines.append("[journal]")
    lines += [f"{f.name} = {_toml_value(getattr(config.journal, f.name))}"
              for f in dataclasses.fields(config.journal)]
    for route in config.routes:
        lines.append("[[routes]]")
        lines += [f"{f.name} = {_toml_value(getattr(route, f.name))}"
                  for f in dataclasses.fields(route)]
    return "\n".join(lines) + "\n"


def _limit_fds(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


async def start_keepstream_process(
    config: Config | str | os.PathLike[str] | None,
    *args: str,
    workdir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 20.0,
    nofile: int | None = None,
) -> KeepstreamProcess:
    """Start ``python -m keepstream serve --config FILE [args]`` and wait until it listens.

    ``config`` is a :class:`~keepstream.Config` (written to ``workdir/keepstream.toml``, in a
    new temporary directory if ``workdir`` is None, with ``server.bind`` replaced by
    ``127.0.0.1:0``) or the path of a TOML file (used as it is; bind
    it to ``127.0.0.1:0``). ``args`` are more ``serve`` options (``--workers 2``). With
    ``config=None`` no ``--config`` is passed: the command is
    ``python -m keepstream serve --bind 127.0.0.1:0 [args]``, configured by its flags
    (``"--upstream", url, "--journal", journal_url``) and the environment, as a user runs it;
    its stderr goes to ``workdir`` (a new temporary directory if None). The caller
    owns the process: stop it with :meth:`KeepstreamProcess.send_signal` and ``wait``, or use
    :func:`run_keepstream_process`, which always does. ``nofile`` sets the process's
    ``RLIMIT_NOFILE`` (soft and hard), for fd-exhaustion tests.
    """
    if isinstance(config, Config):
        directory = Path(workdir) if workdir is not None else \
            Path(tempfile.mkdtemp(prefix="keepstream-test-"))
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, bind="127.0.0.1:0"))
        path = directory / "keepstream.toml"
        path.write_text(config_toml(config), encoding="utf-8")
        serve = ["--config", str(path)]
    elif config is None:
        directory = Path(workdir) if workdir is not None else \
            Path(tempfile.mkdtemp(prefix="keepstream-test-"))
        serve = ["--bind", "127.0.0.1:0"]
    else:
        path = Path(config)
        directory = Path(workdir) if workdir is not None else path.parent
        serve = ["--config", str(path)]
    stderr_path = directory / "keepstream.stderr.txt"
    with stderr_path.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "keepstream", "serve", *serve, *args],
            stdout=subprocess.PIPE, stderr=err,
            env=None if env is None else {**os.environ, **env},
            preexec_fn=None if nofile is None else partial(_limit_fds, nofile),
        )
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.fail_after(startup_timeout):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(
                        f"keepstream serve exited before listening: "
                        f"{stderr_path.read_text(errors='replace')[-2000:]}")
                buf += chunk
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await proc.wait()
        raise
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if not line.startswith(LISTENING):
        raise RuntimeError(f"unexpected first line from keepstream serve: {line!r}")
    url = line.split()[3]
    return KeepstreamProcess(proc, int(url.rsplit(":", 1)[1]), url, stderr_path,
                             trio.current_time())


@asynccontextmanager
async def run_keepstream_process(
    config: Config | str | os.PathLike[str] | None,
    *args: str,
    workdir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 20.0,
    stop_timeout: float = 15.0,
    nofile: int | None = None,
) -> AsyncIterator[KeepstreamProcess]:
    """:func:`start_keepstream_process` for the duration of the block.

    Leaving the block sends SIGTERM if the process still runs, waits up to ``stop_timeout``
    seconds for it to exit, then SIGKILLs it: a test never leaves a server behind.
    """
    ks = await start_keepstream_process(config, *args, workdir=workdir, env=env,
                                        startup_timeout=startup_timeout, nofile=nofile)
    try:
        yield ks
    finally:
        with trio.CancelScope(shield=True):
            ks.send_signal(signal.SIGTERM)
            with trio.move_on_after(stop_timeout):
                await ks.wait()
            if ks.returncode is None:
                ks.kill()
                await ks.wait()
