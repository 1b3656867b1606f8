"""Run the whole keepstream server beside your own tasks, in one nursery of your Trio program.

``keepstream.serve(config, task_status=...)`` is ``keepstream serve`` as a function: Hypercorn,
the journal writer, the stream supervisor and the shutdown sequence (stop accepting, drain
for up to ``drain_timeout``, interrupt the rest, persist, close). Your program keeps its own
tasks next to it; here a reporter polls keepstream's metrics endpoint.

Shutdown is one of:

* ``shutdown_trigger``: when it returns, keepstream drains and ``serve`` returns; the program
  then cancels its own tasks (``nursery.cancel_scope.cancel()``) and leaves the nursery;
* ``handle_signals=True`` (the command line, main thread only): keepstream handles SIGTERM and
  SIGINT itself (first: drain; second: interrupt now) and ``serve`` returns the same way;
* cancelling the nursery from outside: ``serve`` leaves at once, its streams are interrupted
  and persisted on the way out.

Run it::

    python examples/embed_serve.py                       # starts a fake LLM upstream too
    python examples/embed_serve.py --upstream http://127.0.0.1:9000 --bind 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

import httpx
import trio

import keepstream
from keepstream.testing import FakeUpstream, run_fake_upstream

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def make_config(upstream_url: str, *, bind: str = "127.0.0.1:0", journal_url: str = "memory:",
                drain_timeout: float = 5.0) -> keepstream.Config:
    """One route, ``/v1/`` -> the upstream's ``/v1/``, served on ``bind``."""
    return keepstream.Config(
        routes=(keepstream.Route(prefix="/v1/", upstream=upstream_url.rstrip("/") + "/v1/"),),
        server=keepstream.ServerConfig(bind=bind, drain_timeout=drain_timeout),
        journal=keepstream.JournalConfig(url=journal_url),
    )


def _metric(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[-1]
    return "?"


async def report_metrics(url: str, interval: float, log: Log) -> None:
    """The program's own task: log keepstream's live and started stream counts, forever."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=5.0) as client:
        while True:
            try:
                resp = await client.get("/_keepstream/metrics")
                log(f"reporter: live={_metric(resp.text, 'keepstream_streams_live')} "
                    f"started={_metric(resp.text, 'keepstream_streams_started_total')}")
            except httpx.HTTPError as exc:
                log(f"reporter: metrics unavailable ({exc!r})")
            await trio.sleep(interval)


async def run_program(
    upstream_url: str,
    *,
    bind: str = "127.0.0.1:0",
    journal_url: str = "memory:",
    drain_timeout: float = 5.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = False,
    report_interval: float = 5.0,
    log: Log = _print,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """keepstream and the program's own tasks in one nursery; returns after a clean shutdown.

    ``task_status.started()`` gets keepstream's URL once it listens.
    """
    config = make_config(upstream_url, bind=bind, journal_url=journal_url,
                         drain_timeout=drain_timeout)
    async with trio.open_nursery() as nursery:

        async def keepstream_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            await keepstream.serve(config, shutdown_trigger=shutdown_trigger,
                                   handle_signals=handle_signals, task_status=task_status)
            log("keepstream: drained and stopped")
            nursery.cancel_scope.cancel()  # keepstream is done: stop the program's own tasks

        binds: list[str] = await nursery.start(keepstream_then_stop)
        url = binds[0]
        log(f"embed_serve: listening on {url}")
        nursery.start_soon(report_metrics, url, report_interval, log)
        task_status.started(url)
    log("embed_serve: all tasks ended")


async def _main(upstream_url: str | None, bind: str, journal_url: str) -> None:
    async with trio.open_nursery() as nursery:
        if upstream_url is None:
            fake: FakeUpstream = await nursery.start(run_fake_upstream)
            upstream_url = fake.url
            _print(f"fake LLM upstream on {upstream_url}")
        # keepstream handles SIGINT/SIGTERM itself: the first one drains, then this returns.
        await run_program(upstream_url, bind=bind, journal_url=journal_url, handle_signals=True)
        nursery.cancel_scope.cancel()  # stop the fake upstream


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python examples/embed_serve.py [--upstream URL] [--bind HOST:PORT]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", help="LLM upstream origin (default: start a fake one)")
    parser.add_argument("--bind", default="127.0.0.1:8080")
    parser.add_argument("--journal", default="memory:", help="sqlite:///PATH or memory:")
    args = parser.parse_args(argv)
    trio.run(_main, args.upstream, args.bind, args.journal)


if __name__ == "__main__":
    main()
