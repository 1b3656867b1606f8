"""The ``keepstream`` command line (DESIGN section 4)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from ._config import SHUTDOWN_MARGIN, Config, JournalConfig, Route
from ._errors import ConfigError, JournalError
from ._journal import open_backend
from ._record import record_json

# Environment variables map onto keys the same way as flags; flags win over the environment,
# which wins over the file. Documented in docs/configuration.md.
ENV_KEYS = {
    "KEEPSTREAM_BIND": ("server", "bind", str),
    "KEEPSTREAM_DRAIN_TIMEOUT": ("server", "drain_timeout", float),
    "KEEPSTREAM_STOP_GRACE": ("server", "stop_grace", float),
    "KEEPSTREAM_WORKERS": ("server", "workers", int),
    "KEEPSTREAM_MAX_STREAMS": ("server", "max_streams", int),
    "KEEPSTREAM_JOURNAL": ("journal", "url", str),
    "KEEPSTREAM_ENGINE": ("server", "engine", str),
}


def build_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Config from ``--config`` (or ``KEEPSTREAM_CONFIG``), then environment, then flags."""
    env = dict(os.environ) if env is None else env
    path = getattr(args, "config", None) or env.get("KEEPSTREAM_CONFIG")
    base = Config.from_toml(path) if path else Config()
    server: dict[str, Any] = {}
    journal: dict[str, Any] = {}
    tables = {"server": server, "journal": journal}
    for var, (table, key, kind) in ENV_KEYS.items():
        if var in env:
            try:
                tables[table][key] = kind(env[var])
            except ValueError:
                raise ConfigError(
                    f"{table}.{key}", f"{var}={env[var]!r} is not a {kind.__name__}"
                ) from None
    if getattr(args, "bind", None):
        server["bind"] = args.bind
    if getattr(args, "drain_timeout", None) is not None:
        server["drain_timeout"] = args.drain_timeout
    if getattr(args, "workers", None) is not None:
        server["workers"] = args.workers
    if getattr(args, "engine", None):
        server["engine"] = args.engine
    if getattr(args, "journal", None):
        journal["url"] = args.journal
    routes = list(base.routes)
    upstream = getattr(args, "upstream", None) or env.get("KEEPSTREAM_UPSTREAM")
    if upstream:
        routes = [r for r in routes if r.prefix != "/"] + [Route(prefix="/", upstream=upstream)]
    on_disc = getattr(args, "on_disconnect", None) or env.get("KEEPSTREAM_ON_DISCONNECT")
    resumable = getattr(args, "resumable", False)
    changed = []
    for r in routes:
        kw: dict[str, Any] = {}
        if on_disc:
            kw["on_disconnect"] = on_disc
        if resumable:
            kw["resumable"] = True
        changed.append(_replace(r, kw))
    return Config(
        routes=tuple(changed),
        server=_replace(base.server, server),
        journal=_replace(base.journal, journal),
    )


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes) if changes else obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keepstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", help="TOML config file (default: $KEEPSTREAM_CONFIG)")
    s.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    s.add_argument("--upstream", help="shorthand for one route '/' -> URL")
    s.add_argument("--journal", help="journal URL (default sqlite:///keepstream.db)")
    s.add_argument("--on-disconnect", choices=["finish", "cancel"])
    s.add_argument("--drain-timeout", type=float, metavar="S")
    s.add_argument("--workers", type=int, metavar="N")
    s.add_argument("--engine", choices=["hypercorn", "lean"],
                   help="HTTP server: hypercorn (default) or lean (keepstream's own "
                        "HTTP/1.1 engine: faster, plain HTTP/1.1 only)")
    s.add_argument("--resumable", action="store_true",
                   help="give SSE events ids a reconnecting client can resume from")

    st = sub.add_parser("streams", help="read the journal")
    ssub = st.add_subparsers(dest="streams_command", required=True)
    ls = ssub.add_parser("list", help="list stream records, newest first")
    ls.add_argument("--journal", default=None)
    ls.add_argument("--status")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    sh = ssub.add_parser("show", help="show one record")
    sh.add_argument("id")
    sh.add_argument("--journal", default=None)
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--body", action="store_true",
                    help="write the raw journaled body bytes to stdout, nothing else")

    pr = ssub.add_parser("prune", help="delete terminal records older than --older-than")
    pr.add_argument("--journal", default=None)
    pr.add_argument("--older-than", type=float, metavar="S", default=None,
                    help="seconds (default: journal.retention from the config)")

    d = sub.add_parser("demo", help="the main job end to end, with a built-in fake upstream")
    d.add_argument("--no-live", action="store_true", help="do not print tokens as they arrive")
    cc = sub.add_parser("check-config", help="validate a config file, shutdown budget included")
    cc.add_argument("file")
    return p


def _journal_url(args: argparse.Namespace) -> str:
    if args.journal:
        return str(args.journal)
    if "KEEPSTREAM_JOURNAL" in os.environ:
        return os.environ["KEEPSTREAM_JOURNAL"]
    if os.environ.get("KEEPSTREAM_CONFIG"):
        return Config.from_toml(os.environ["KEEPSTREAM_CONFIG"]).journal.url
    return JournalConfig().url


def _cmd_streams(args: argparse.Namespace) -> int:
    url = _journal_url(args)
    Config(journal=JournalConfig(url=url))  # validates the URL
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        print(f"keepstream: no journal at {url}", file=sys.stderr)
        return 1
    backend = open_backend(url)
    backend.setup()
    try:
        if args.streams_command == "prune":
            older = args.older_than
            if older is None:
                path = os.environ.get("KEEPSTREAM_CONFIG")
                older = Config.from_toml(path).journal.retention if path else 0.0
            if older <= 0:
                print("keepstream: give --older-than S (or set journal.retention)",
                      file=sys.stderr)
                return 2
            n = backend.prune(time.time() - older)
            print(f"pruned {n} record(s) that ended more than {older:g} s ago")
            return 0
        if args.streams_command == "list":
            rows = backend.list_records(args.status, args.limit)
            if args.json:
                print(json.dumps([record_json(r) for r in rows], indent=2))
            else:
                print(format_table([record_json(r) for r in rows]))
            return 0
        row = backend.get(args.id)
        if row is None:
            print(f"keepstream: no stream {args.id!r} in {url}", file=sys.stderr)
            return 1
        if args.body:
            sys.stdout.flush()
            sys.stdout.buffer.write(backend.read_body(args.id))
            sys.stdout.buffer.flush()
        elif args.json:
            print(json.dumps(record_json(row), indent=2))
        else:
            for k, v in record_json(row).items():
                print(f"{k:15} {v}")
        return 0
    finally:
        backend.close()


def format_table(records: Sequence[dict[str, Any]]) -> str:
    cols = ("id", "status", "route", "path", "upstream_status", "bytes", "events",
            "client_gone_at", "reason")
    rows = [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    widths[-1] = min(widths[-1], 40)
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(v[:w].ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    if not config.routes:
        raise ConfigError("routes", "no routes: give --upstream URL or [[routes]] in --config")
    from ._config import upstream_credentials
    from ._server import serve

    upstream_credentials(config)  # a missing upstream credential: exit 2 before anything runs
    if config.server.workers > 1:
        from ._workers import run_workers

        return run_workers(config)
    hard_exit = config.server.persist_timeout + SHUTDOWN_MARGIN + 1.0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                lambda task_status: serve(config, hard_exit_after_drain=hard_exit,
                                          task_status=task_status))
            for b in binds:
                print(f"keepstream listening on {b}", flush=True)

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # One keepstream error from start-up (journal cannot open, ...): report it plainly.
        leaves = group.subgroup((ConfigError, JournalError))
        if leaves is not None and len(leaves.exceptions) == 1 and \
                not isinstance(leaves.exceptions[0], BaseExceptionGroup):
            raise leaves.exceptions[0] from group
        raise
    print("keepstream: drained, exiting", file=sys.stderr, flush=True)
    # Every record is persisted and the journal closed: skip the interpreter's teardown of a
    # large heap (0.4 s with 1,000 streams just drained), which counts against the platform's
    # stop grace. Only here, in the process ``keepstream serve`` owns.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "streams":
            return _cmd_streams(args)
        if args.command == "check-config":
            cfg = Config.from_toml(args.file)
            s = cfg.server
            print(f"{args.file}: ok ({len(cfg.routes)} route(s); shutdown budget "
                  f"{s.drain_delay + s.drain_timeout + s.persist_timeout:g} s + margin "
                  f"within stop_grace {s.stop_grace:g} s)")
            return 0
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(live=not args.no_live)
    except ConfigError as exc:
        print(f"keepstream: config error: {exc}", file=sys.stderr)
        return 2
    except JournalError as exc:
        print(f"keepstream: journal error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
