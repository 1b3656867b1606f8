from __future__ import annotations

from pathlib import Path

import pytest

from keepstream import Config, ConfigError, JournalConfig, Route, ServerConfig


def test_defaults_are_valid_and_match_the_contract() -> None:
    c = Config()
    assert c.server.bind == "127.0.0.1:8080"
    assert c.server.drain_timeout == 8.0 and c.server.stop_grace == 10.0
    assert c.journal.url == "sqlite:///keepstream.db"
    r = Route(prefix="/v1/", upstream="http://127.0.0.1:9000/v1/")
    assert r.on_disconnect == "finish" and r.finish_timeout == 300.0 and r.resumable is False


def test_from_toml_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        '[server]\nbind = "127.0.0.1:9999"\ndrain_timeout = 20\nstop_grace = 30\n'
        '[journal]\nurl = "memory:"\nflush_interval_ms = 10\n'
        '[[routes]]\nprefix = "/v1/"\nupstream = "http://127.0.0.1:9000/v1/"\n'
        'on_disconnect = "cancel"\n'
    )
    c = Config.from_toml(p)
    assert c.server.drain_timeout == 20.0 and isinstance(c.server.drain_timeout, float)
    assert c.journal.url == "memory:"
    assert c.routes[0].on_disconnect == "cancel"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"server": {"nope": 1}}, "server.nope"),
        ({"server": {"drain_timeout": "8"}}, "server.drain_timeout"),
        ({"server": {"drain_timeout": -1.0}}, "server.drain_timeout"),
        ({"server": {"workers": 0}}, "server.workers"),
        ({"server": {"workers": 1.5}}, "server.workers"),
        ({"server": {"bind": "nohost"}}, "server.bind"),
        ({"server": {"drain_timeout": 9.0, "stop_grace": 10.0}}, "server.stop_grace"),
        ({"journal": {"url": "mysql://x"}}, "journal.url"),
        ({"journal": {"url": "postgresql://x/y"}}, "journal.url"),
        ({"routes": [{"prefix": "v1", "upstream": "http://h:1"}]}, "routes[0].prefix"),
        ({"routes": [{"prefix": "/", "upstream": "ftp://h"}]}, "routes[0].upstream"),
        ({"routes": [{"prefix": "/", "upstream": "http://u:p@h"}]}, "routes[0].upstream"),
        ({"routes": [{"prefix": "/", "upstream": "http://h", "on_disconnect": "x"}]},
         "routes[0].on_disconnect"),
        ({"routes": [{"prefix": "/", "upstream": "http://h", "finish_timeout": 0}]},
         "routes[0].finish_timeout"),
        ({"routes": [{"prefix": "/", "upstream": "http://h", "resumable": 1}]},
         "routes[0].resumable"),
        ({"routes": [{"prefix": "/", "upstream": "http://h"}, {"prefix": "/",
                                                            "upstream": "http://h"}]},
         "routes[1].prefix"),
        ({"routes": [{"prefix": "/_keepstream/x", "upstream": "http://h"}]}, "routes[0].prefix"),
        ({"routes": [{"upstream": "http://h"}]}, "routes[0].prefix"),
        ({"routes": {"prefix": "/"}}, "routes"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.key == key
    assert str(info.value).startswith(key + ":")


def test_code_built_config_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"server\.stop_grace"):
        Config(server=ServerConfig(drain_timeout=25.0, stop_grace=10.0))
    with pytest.raises(ConfigError, match=r"journal\.flush_bytes"):
        Config(journal=JournalConfig(flush_bytes=0))
    # Kubernetes-sized budget is fine.
    Config(server=ServerConfig(drain_timeout=25.0, stop_grace=30.0))


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)


def _doc_section(doc: str, heading: str) -> str:
    part = doc[doc.index(heading):]
    return part[: part.index("\n## ", len(heading))]


@pytest.mark.parametrize(("cls", "heading"), [
    (ServerConfig, "## `[server]`"), (JournalConfig, "## `[journal]`"), (Route, "## `[[routes]]`"),
])
def test_every_key_is_documented_with_its_default(cls: type, heading: str) -> None:
    """docs/configuration.md has a row per key of ``_config.py``, with the code's default."""
    import dataclasses
    import re
    import tomllib

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    section = _doc_section(doc, heading)
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", section, re.M))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(rows) == set(fields)
    for name, f in fields.items():
        cell = rows[name].strip()
        if f.default is dataclasses.MISSING:
            assert cell == "required", name
            continue
        literal = re.match(r"`([^`]*)`", cell)
        assert literal is not None, (name, cell)
        value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert value == default and type(value) is type(default), (name, value, f.default)


def test_complete_example_in_the_docs_is_valid() -> None:
    import re
    import tomllib

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    example = re.search(r"## Complete example\n.*?```toml\n(.*?)```", doc, re.S)
    assert example is not None
    cfg = Config.from_mapping(tomllib.loads(example.group(1)))
    assert len(cfg.routes) == 2
