"""The layering of docs/design.md, checked on the source: sans-IO modules import no I/O library
and nothing from the Trio edge; the edge depends one way (each module imports only modules of a
lower layer). Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import keepstream

SRC = Path(keepstream.__file__).parent
IO_LIBRARIES = {"trio", "httpx", "hypercorn", "h11", "httpcore", "sqlite3", "socket"}
SANS_IO = {"_errors", "_sse", "_state", "_rules", "_record", "_config"}
#: Edge modules by layer: a module may import modules of lower layers only.
LAYER = {
    **dict.fromkeys(SANS_IO, 0),
    "_journal": 1,
    "_pool": 1,
    "_transport": 1,
    "_poller": 1,
    "_supervisor": 2,
    "_resume": 3,
    "_app": 4,
    "_proxy": 5,
    "_connections": 5,
    "_h1": 5,
    "_server": 6,
    "_asgi_app": 6,
    "_workers": 7,
    "asgi": 7,
    "_worker": 8,
    "_cli": 9,
    "_demo": 9,
    "testing": 8,
}
#: Modules of one layer that may import each other.
PEERS = [SANS_IO, {"_cli", "_demo"}]


def _imports(path: Path, level: int = 1) -> tuple[set[str], set[str]]:
    """(keepstream modules, top-level outside modules) that ``path`` imports; ``level`` is how
    many dots name keepstream's own package from there (2 inside ``keepstream.testing``)."""
    own: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == level and node.module:
                own.add(node.module.split(".")[0])
            elif node.level == 0 and node.module:
                outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
    return own, outside


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(LAYER), modules - set(LAYER)


def test_sans_io_modules_import_no_io() -> None:
    for name in SANS_IO:
        own, outside = _imports(SRC / f"{name}.py")
        assert not outside & IO_LIBRARIES, (name, outside & IO_LIBRARIES)
        assert own <= SANS_IO, (name, own - SANS_IO)


def test_the_edge_depends_one_way() -> None:
    for name, layer in LAYER.items():
        path = SRC / f"{name}.py"
        if not path.exists():
            continue
        own, _ = _imports(path)
        for dep in own:
            same = any(name in group and dep in group for group in PEERS)
            assert same or LAYER[dep] < layer, f"{name} (layer {layer}) imports {dep} " \
                f"(layer {LAYER[dep]})"


def test_the_test_kit_uses_only_the_public_layers() -> None:
    for path in (SRC / "testing").glob("*.py"):
        own, _ = _imports(path, level=2)
        for dep in own:
            assert LAYER[dep] < LAYER["testing"], (path.name, dep)
