"""The layers a newcomer sees in the folders (docs/architecture.md), held by the imports themselves.

    fedspeech.app                      CLI, simulate, demo, Flower launcher      (top)
    fedspeech_client | fedspeech_server  ML/aggregation + thin Flower/MLflow adapters (beside)
    fedspeech (core)                   config, model, decoding, privacy ledger, model dir
    fedspeech_features                 audio -> MFCC -> tensors, text, manifests, corpora (bottom)

Every import statement counts, lazy ones inside functions included (AST scan of the sources):
a layer imports only its own and lower layers, client and server never import each other, and
Flower/MLflow are imported only by the adapters and the app. Direct imports that all point down
make every chain of imports point down, so the direct rule is the whole contract.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder in the checkout
PACKAGES = {
    "fedspeech": ROOT / "fedspeech",
    "fedspeech_features": ROOT / "features",
    "fedspeech_client": ROOT / "client",
    "fedspeech_server": ROOT / "server",
}
OURS = ("fedspeech", "fedspeech_features", "fedspeech_client", "fedspeech_server")


def layer(module: str) -> str:
    """The layer of one of our modules: features, core, client, server or app."""
    if module == "fedspeech.app" or module.startswith("fedspeech.app."):
        return "app"
    return {
        "fedspeech": "core",
        "fedspeech_features": "features",
        "fedspeech_client": "client",
        "fedspeech_server": "server",
    }[module.split(".")[0]]


# what each layer may import (besides itself)
ALLOWED = {
    "features": set(),
    "core": {"features"},
    "client": {"core", "features"},
    "server": {"core", "features"},
    "app": {"core", "features", "client", "server"},
}
ADAPTER_ONLY = ("flwr", "mlflow")  # frameworks kept out of the core and the features


def modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), path


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import statement, relative ones resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from fedspeech import app` imports fedspeech.app
                yield node.lineno, f"{target}.{alias.name}"


def _ours(name: str) -> str | None:
    """``name`` if it is one of our modules (or a name inside one), else None."""
    if name.split(".")[0] not in OURS:
        return None
    parts = name.split(".")
    while parts:  # the longest prefix that is a module
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


MODULES = dict(modules())


def violation(source_module: str, imported: str) -> str | None:
    """Why ``source_module`` may not import ``imported`` (None: it may)."""
    source = layer(source_module)
    target = _ours(imported)
    if target is None:
        if imported.split(".")[0] in ADAPTER_ONLY and source in ("core", "features"):
            return f"{source} imports {imported}"
        return None
    dest = layer(target)
    if dest != source and dest not in ALLOWED[source]:
        return f"{source} imports {dest} ({target})"
    return None


def test_every_import_points_down_the_layers() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {why}"
        for module, path in MODULES.items()
        for line, name in imports(module, path)
        if (why := violation(module, name))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "imported"),
    [
        ("fedspeech_client.train", "fedspeech_server.strategy"),
        ("fedspeech_server.run", "fedspeech_client.app"),
        ("fedspeech.config", "fedspeech.app.simulate"),
        ("fedspeech.model", "fedspeech_client.train"),
        ("fedspeech_features.mfcc", "fedspeech.config"),
        ("fedspeech.transcribe", "flwr.app"),
        ("fedspeech_features.cache", "mlflow"),
    ],
)
def test_the_rule_catches_an_upward_or_sideways_import(source: str, imported: str) -> None:
    assert violation(source, imported) is not None


def test_the_rule_allows_downward_imports() -> None:
    assert violation("fedspeech.app.simulate", "fedspeech_server.checkpoint") is None
    assert violation("fedspeech_client.train", "fedspeech.model") is None
    assert violation("fedspeech_server.app", "flwr.app") is None


def test_no_import_cycles_between_our_modules() -> None:
    graph = {
        m: {t for _, n in imports(m, p) if (t := _ours(n)) and t != m and not m.startswith(t + ".")}
        for m, p in MODULES.items()
    }
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("rule", ["features", "core", "client", "server"])
def test_the_scan_sees_each_layer(rule: str) -> None:
    """The contract would pass vacuously if the scan found no modules of a layer."""
    assert sum(layer(m) == rule for m in MODULES) >= 3
    assert any(layer(m) == "app" for m in MODULES)


def test_docs_architecture_names_every_module() -> None:
    """docs/architecture.md has one line per module: a new module must get its line."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        m
        for m, path in MODULES.items()
        if path.name != "__init__.py"
        and f"`{m.rsplit('.', 1)[-1]}`" not in text  # e.g. `mfcc`
        and f"`{m.split('.', 1)[1]}`" not in text  # e.g. `corpora.synthetic`
    ]
    assert not missing, f"docs/architecture.md does not name {missing}"
