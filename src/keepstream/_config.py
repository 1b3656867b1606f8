"""Configuration: one typed object, built in code or loaded from TOML, validated the same way.

Every key is documented in ``docs/configuration.md``. Unknown keys and bad values raise
:class:`~keepstream.ConfigError` naming the key (``routes[1].finish_timeout``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._errors import ConfigError
from ._rules import parse_upstream

OnDisconnect = Literal["finish", "cancel"]

#: Seconds the shutdown budget keeps free for process exit after the last persist.
SHUTDOWN_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class Route:
    """One proxied path prefix and the upstream it goes to."""

    prefix: str
    upstream: str
    on_disconnect: OnDisconnect = "finish"
    finish_timeout: float = 300.0
    resumable: bool = False
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    idle_timeout: float = 120.0
    total_timeout: float = 3600.0
    max_streams: int = 0  # concurrent streams on this route; 0 = only server.max_streams
    client_keys_sha256: tuple[str, ...] = ()  # if set: Authorization: Bearer <key> required
    upstream_bearer_env: str = ""  # env var whose value is sent upstream as Bearer credential


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` table: listening address, drain budget, limits and timeouts that apply
    to every route (see docs/configuration.md for each key)."""

    bind: str = "127.0.0.1:8080"
    drain_timeout: float = 8.0
    drain_delay: float = 0.0
    stop_grace: float = 10.0
    persist_timeout: float = 1.0
    workers: int = 1
    max_streams: int = 1000
    max_body_bytes: int = 10 * 1024 * 1024
    body_idle_timeout: float = 30.0
    body_timeout: float = 120.0  # the whole request body, however it trickles in
    stream_buffer_bytes: int = 1024 * 1024
    client_stall_timeout: float = 30.0
    max_line_bytes: int = 1024 * 1024
    max_event_bytes: int = 8 * 1024 * 1024
    pool_timeout: float = 1.0
    keep_alive_timeout: float = 75.0
    max_streams_per_client: int = 0  # per credential (hash); 0 = no per-client limit
    max_headers: int = 100
    credential_header: str = "authorization"
    admin_token_sha256: str = ""  # hex SHA-256 of the admin credential; "" = no admin
    engine: str = "hypercorn"  # HTTP/1.1 server of `keepstream serve`: "hypercorn" or "lean"
    #: Waiting streams' upstream sockets are read by one poller task (``keepstream._poller``);
    #: False: each stream task reads its own through trio (the same records, more CPU).
    upstream_poller: bool = True


#: HTTP servers ``keepstream serve`` can run (``server.engine``; docs/configuration.md).
ENGINES = ("hypercorn", "lean")


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """The ``[journal]`` table: where records and bodies go (``sqlite:///PATH``, ``memory:``,
    ``none``), how appends are batched, and how long records are kept."""

    url: str = "sqlite:///keepstream.db"
    flush_interval_ms: float = 50.0
    flush_bytes: int = 256 * 1024
    retention: float = 0.0  # seconds to keep terminal records; 0 keeps them forever


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one keepstream instance.

    Build it in code (``Config(routes=[Route("/", "http://127.0.0.1:9000")])``) or load it with
    :meth:`from_toml` / :meth:`from_mapping`; both run :meth:`validate`.
    """

    routes: tuple[Route, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", tuple(self.routes))
        self.validate()

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Config:
        """Load and validate a TOML file; :class:`ConfigError` names the offending key."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate a config from parsed TOML/JSON-like data (same checks as
        :meth:`from_toml`)."""
        _no_unknown(data, {"server", "journal", "routes"}, "")
        server = _build(ServerConfig, data.get("server", {}), "server")
        journal = _build(JournalConfig, data.get("journal", {}), "journal")
        raw_routes = data.get("routes", [])
        if not isinstance(raw_routes, list):
            raise ConfigError("routes", "must be an array of tables ([[routes]])")
        routes = tuple(_build(Route, r, f"routes[{i}]") for i, r in enumerate(raw_routes))
        return cls(routes=routes, server=server, journal=journal)

    def replace(self, **changes: Any) -> Config:
        """A copy with some top-level fields changed (``server``, ``journal``, ``routes``)."""
        return dataclasses.replace(self, **changes)

    # -- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key."""
        for f in dataclasses.fields(ServerConfig):
            _check_value(f"server.{f.name}", getattr(self.server, f.name), f.type)
        for f in dataclasses.fields(JournalConfig):
            _check_value(f"journal.{f.name}", getattr(self.journal, f.name), f.type)
        s = self.server
        _parse_bind(s.bind, "server.bind")
        for name in ("drain_timeout", "drain_delay", "pool_timeout"):
            _non_negative(f"server.{name}", getattr(s, name))
        # 0 would refuse every stream (a record must be durable within it) and drop every
        # terminal write: it must be positive.
        _positive("server.persist_timeout", s.persist_timeout)
        for name in ("stop_grace", "body_idle_timeout", "body_timeout", "client_stall_timeout",
                     "keep_alive_timeout"):
            _positive(f"server.{name}", getattr(s, name))
        for name in ("workers", "max_streams", "max_body_bytes", "stream_buffer_bytes",
                     "max_line_bytes", "max_event_bytes"):
            if getattr(s, name) < 1:
                raise ConfigError(f"server.{name}", "must be at least 1")
        budget = s.drain_delay + s.drain_timeout + s.persist_timeout + SHUTDOWN_MARGIN
        if budget > s.stop_grace:
            raise ConfigError(
                "server.stop_grace",
                f"shutdown budget drain_delay + drain_timeout + persist_timeout + margin "
                f"= {s.drain_delay:g} + {s.drain_timeout:g} + {s.persist_timeout:g} + "
                f"{SHUTDOWN_MARGIN:g} = {budget:g} s exceeds stop_grace = {s.stop_grace:g} s; "
                f"the platform would SIGKILL keepstream before it persists",
            )
        j = self.journal
        _journal_kind(j.url)
        if not j.flush_interval_ms > 0 or math.isinf(j.flush_interval_ms):
            raise ConfigError("journal.flush_interval_ms",
                              f"must be a positive number of milliseconds, "
                              f"not {j.flush_interval_ms!r}")
        _non_negative("journal.retention", j.retention)
        if s.max_streams_per_client < 0:
            raise ConfigError("server.max_streams_per_client", "must be 0 (no limit) or more")
        if s.engine not in ENGINES:
            raise ConfigError("server.engine", f"must be one of {', '.join(ENGINES)}, "
                                               f"not {s.engine!r}")
        if s.max_headers < 1:
            raise ConfigError("server.max_headers", "must be at least 1")
        tok = s.admin_token_sha256
        if tok and not _is_sha256(tok):
            raise ConfigError("server.admin_token_sha256",
                              "must be 64 lowercase hex digits (sha256 of the admin token)")
        if not s.credential_header or not s.credential_header.isascii() or \
                s.credential_header != s.credential_header.lower():
            raise ConfigError("server.credential_header", "must be a lowercase header name")
        if j.flush_bytes < 1:
            raise ConfigError("journal.flush_bytes", "must be at least 1")
        seen: set[str] = set()
        for i, r in enumerate(self.routes):
            key = f"routes[{i}]"
            if not isinstance(r, Route):
                raise ConfigError(key, "must be a keepstream.Route")
            for f in dataclasses.fields(Route):
                _check_value(f"{key}.{f.name}", getattr(r, f.name), f.type)
            if not r.prefix.startswith("/"):
                raise ConfigError(f"{key}.prefix", "must start with '/'")
            if r.prefix.startswith("/_keepstream"):
                raise ConfigError(f"{key}.prefix", "/_keepstream/ is reserved")
            if r.prefix in seen:
                raise ConfigError(f"{key}.prefix", f"duplicate prefix {r.prefix!r}")
            seen.add(r.prefix)
            try:
                parse_upstream(r.upstream)
            except ValueError as exc:
                raise ConfigError(f"{key}.upstream", str(exc)) from None
            if r.on_disconnect not in ("finish", "cancel"):
                raise ConfigError(f"{key}.on_disconnect", "must be 'finish' or 'cancel'")
            for name in ("finish_timeout", "connect_timeout", "first_byte_timeout",
                         "idle_timeout", "total_timeout"):
                _positive(f"{key}.{name}", getattr(r, name))
            if r.max_streams < 0:
                raise ConfigError(f"{key}.max_streams", "must be 0 (no limit) or more")
            for n, digest in enumerate(r.client_keys_sha256):
                if not _is_sha256(digest):
                    raise ConfigError(f"{key}.client_keys_sha256[{n}]",
                                      "must be 64 lowercase hex digits (sha256 of the key)")
            if r.upstream_bearer_env and not r.upstream_bearer_env.replace("_", "").isalnum():
                raise ConfigError(f"{key}.upstream_bearer_env",
                                  "must be an environment variable name")


def journal_kind(url: str) -> str:
    """``sqlite``, ``postgresql``, ``memory`` or ``none`` for a journal URL."""
    return _journal_kind(url)


def _journal_kind(url: str) -> str:
    if url == "memory:":
        return "memory"
    if url == "none":
        return "none"
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("journal.url", "the PostgreSQL journal is not implemented yet")
    raise ConfigError(
        "journal.url",
        f"{url!r} is not a journal URL (sqlite:///PATH, memory:, none)",
    )


def parse_bind(bind: str) -> tuple[str, int]:
    return _parse_bind(bind, "server.bind")


def _parse_bind(bind: str, key: str) -> tuple[str, int]:
    if bind.startswith("fd://"):
        raise ConfigError(key, "fd:// binds are not supported; keepstream creates its socket")
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"{bind!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _positive(key: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigError(key, f"must be a positive number of seconds, not {value!r}")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ConfigError(key, f"must be zero or more, not {value!r}")


def _check_value(key: str, value: object, annotation: object) -> None:
    ann = str(annotation)
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, not {value!r}")
    elif ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, not {value!r}")
    elif ann == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, not {value!r}")
    elif ann in ("str", "OnDisconnect") and not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {value!r}")
    elif ann == "tuple[str, ...]" and (
        not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)
    ):
        raise ConfigError(key, f"must be an array of strings, not {value!r}")


def _no_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in data:
        if k not in allowed:
            name = f"{where}.{k}" if where else k
            raise ConfigError(name, "unknown key")


def _build(cls: Any, data: object, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(where, "must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(data, set(names), where)
    for k, v in data.items():
        _check_value(f"{where}.{k}", v, names[k].type)
    kwargs = {k: float(v) if str(names[k].type) == "float" else
              tuple(v) if str(names[k].type) == "tuple[str, ...]" else v
              for k, v in data.items()}
    missing = [n for n, f in names.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}", "is required")
    return cls(**kwargs)


def upstream_credentials(config: Config) -> dict[str, bytes]:
    """``Authorization`` values to send upstream, per route prefix, read from the environment
    (``routes[].upstream_bearer_env``). Raises :class:`ConfigError` naming the key when a
    variable is unset or empty, so start-up fails before anything is opened."""
    out: dict[str, bytes] = {}
    for i, route in enumerate(config.routes):
        if not route.upstream_bearer_env:
            continue
        value = os.environ.get(route.upstream_bearer_env, "")
        if not value:
            raise ConfigError(f"routes[{i}].upstream_bearer_env",
                              f"${route.upstream_bearer_env} is not set")
        try:
            out[route.prefix] = b"Bearer " + value.strip().encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(f"routes[{i}].upstream_bearer_env",
                              f"${route.upstream_bearer_env} must be ASCII") from None
        if any(c in value.strip() for c in "\r\n\0"):
            raise ConfigError(f"routes[{i}].upstream_bearer_env",
                              f"${route.upstream_bearer_env} contains a control character")
    return out
