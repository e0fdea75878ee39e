"""The house rules of ARCHITECTURE.md, checked on the source: layers, imports, room sizes.

No services: the modules of ``viewkeeper/`` and ``views/`` are parsed (never imported), and
every ``import`` in them — at the top, inside functions, under ``TYPE_CHECKING`` — is an
arrow from one module to another. The rules:

- layers: ``projection`` (the user's API and the view model; the package's ``__init__``
  re-exports it) at the bottom; ``stream``, ``sinks`` and ``coordination`` above it, which
  import ``projection`` and never one another; ``runtime`` above those; the operations
  (``app``, ``cli``, ``config``, ``ops``) on top. Every arrow runs downward or stays in its
  part; only the top layer's parts import one another (the assembly reads the config, the
  CLI and the demo run the assembly), the cycle check keeps them apart;
- no cycles between modules;
- only ``sinks/`` imports redis and opensearchpy; boto3 and botocore are never imported by
  the view model, the runtime or the sinks (but for the SigV4 signer in ``sinks/connect.py``);
- the example views import nothing of viewkeeper but its public API (``viewkeeper``);
- a module over 500 lines says why at its top (a line ``Over 500 lines: ...`` in its
  docstring).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "viewkeeper"

# the layer of each top-level part of the package: an import may go to a lower layer, or
# stay inside its own part; parts of one layer do not import one another, but for the top's
LAYERS: dict[str, int] = {
    "projection": 0,
    "": 0,  # viewkeeper/__init__.py: the public API, re-exported from projection
    "stream": 1,
    "sinks": 1,
    "coordination": 1,
    "runtime": 2,
    "app": 3,
    "cli": 3,
    "config": 3,
    "ops": 3,
}
TOP = max(LAYERS.values())
SIZE_LIMIT = 500
SIZE_REASON = "Over 500 lines:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    """``viewkeeper.sinks.redis`` → ``sinks``; ``viewkeeper`` → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module imported) for every import of the file, wherever it is."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # from viewkeeper.runtime import metrics
                yield node.lineno, f"{node.module}.{alias.name}"


def _resolve(name: str) -> str | None:
    """The viewkeeper module an imported name belongs to (None: not viewkeeper's)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _arrows() -> dict[str, set[tuple[int, str]]]:
    arrows: dict[str, set[tuple[int, str]]] = {}
    for module, path in MODULES.items():
        out: set[tuple[int, str]] = set()
        for line, name in _imports(path):
            if not name.startswith("viewkeeper"):
                continue
            target = _resolve(name)
            # a module's own packages run before it anyway: ``from viewkeeper.cli import
            # failures`` in viewkeeper.cli.common is an arrow to failures, not to cli
            if target is not None and not (module + ".").startswith(target + "."):
                out.add((line, target))
        arrows[module] = out
    return arrows


ARROWS = _arrows()


def test_every_part_of_the_package_has_a_layer() -> None:
    unknown = sorted({_part(m) for m in MODULES} - LAYERS.keys())
    assert not unknown, f"parts of viewkeeper/ with no layer in LAYERS: {unknown}"


def layer_violations(arrows: dict[str, set[tuple[int, str]]]) -> list[str]:
    """The arrows that run upward or sideways between parts of one layer."""
    wrong = []
    for module, out in arrows.items():
        here = _part(module)
        for line, target in sorted(out):
            there = _part(target)
            if here == there or (here == "" and there == "projection"):
                continue
            if LAYERS[there] > LAYERS[here] or LAYERS[there] == LAYERS[here] < TOP:
                wrong.append(
                    f"{module}:{line} (layer {LAYERS[here]}) imports {target} "
                    f"(layer {LAYERS[there]})"
                )
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_import_runs_downward_or_stays_in_its_part() -> None:
    wrong = layer_violations(ARROWS)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    found = cycles({m: {t for _, t in arrows} for m, arrows in ARROWS.items()})
    assert not found, f"modules that import each other (directly or not): {found}"


# (library, the parts of viewkeeper that may import it)
LIBRARIES = [
    ("redis", {"sinks"}),
    ("opensearchpy", {"sinks"}),
    ("boto3", {"stream", "coordination", "app", "cli", "config", "ops", "sinks.connect"}),
    ("botocore", {"stream", "coordination", "app", "cli", "config", "ops", "sinks.connect"}),
]


def library_violations(library: str, allowed: set[str], files: dict[str, Path]) -> list[str]:
    wrong = []
    for module, path in files.items():
        dotted = module.split(".", 1)[1] if "." in module else ""
        if _part(module) in allowed or dotted in allowed:
            continue
        for line, name in _imports(path):
            if name == library or name.startswith(library + "."):
                wrong.append(f"{module}:{line}: imports {name}")
    return sorted(set(wrong))


@pytest.mark.parametrize(("library", "allowed"), LIBRARIES, ids=[lib for lib, _ in LIBRARIES])
def test_only_its_owners_speak_to_a_service(library: str, allowed: set[str]) -> None:
    wrong = library_violations(library, allowed, MODULES)
    assert not wrong, f"{library} imported outside {sorted(allowed)}:\n" + "\n".join(wrong)


def test_views_import_only_the_public_api() -> None:
    views = sorted((ROOT / "views").rglob("*.py"))
    assert views, "no example views found under views/"
    wrong = []
    for path in views:
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in ("redis", "opensearchpy", "boto3", "botocore"):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
            elif top == "viewkeeper" and name != "viewkeeper":
                # `from viewkeeper import X` yields "viewkeeper" and "viewkeeper.X"; X must be
                # a name of the public API, not a module
                if name.count(".") == 1 and name not in MODULES:
                    continue
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert not wrong, "views must import only `viewkeeper` (the public API):\n" + "\n".join(wrong)


def test_a_module_over_500_lines_says_why_at_its_top() -> None:
    wrong = []
    for path in MODULES.values():
        lines = path.read_text().count("\n")
        if lines <= SIZE_LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if SIZE_REASON not in doc:
            wrong.append(f"{path.relative_to(ROOT)}: {lines} lines, no '{SIZE_REASON}' line")
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_what_they_are_for(tmp_path: Path) -> None:
    """The checks above can fail: an arrow upward, an arrow between two parts of one layer,
    a cycle, and a library imported inside a function by a module that may not."""
    assert layer_violations({"viewkeeper.stream.x": {(3, "viewkeeper.runtime.worker")}}) == [
        "viewkeeper.stream.x:3 (layer 1) imports viewkeeper.runtime.worker (layer 2)"
    ]
    assert layer_violations({"viewkeeper.sinks.x": {(1, "viewkeeper.stream.records")}})
    assert not layer_violations({"viewkeeper.runtime.x": {(1, "viewkeeper.stream.records")}})
    assert not layer_violations({"viewkeeper.cli.x": {(1, "viewkeeper.app")}})  # the top's
    assert layer_violations({"viewkeeper.app": {(1, "viewkeeper.cli.run")}}) == []  # idem
    assert layer_violations({"viewkeeper.ops.x": {(1, "viewkeeper.runtime.worker")}}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import redis.client\n\nfrom opensearchpy import OpenSearch\n")
    files = {"viewkeeper.runtime.bad": bad, "viewkeeper.sinks.bad": bad}
    assert library_violations("redis", {"sinks"}, files) == [
        "viewkeeper.runtime.bad:2: imports redis.client"
    ]
    assert library_violations("opensearchpy", {"sinks"}, files) == [
        "viewkeeper.runtime.bad:4: imports opensearchpy",
        "viewkeeper.runtime.bad:4: imports opensearchpy.OpenSearch",
    ]
