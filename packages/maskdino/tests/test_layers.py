"""The layering of docs/architecture.md, checked on the source: packages import only the ones below them, maskdino's
folders only the layers below them, and no package has an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "deform_attn": ROOT / "packages" / "deform-attn" / "src" / "deform_attn",
    "coco_eval": ROOT / "packages" / "coco-eval" / "src" / "coco_eval",
    "detr_core": ROOT / "packages" / "detr-core" / "src" / "detr_core",
    "maskdino": ROOT / "packages" / "maskdino" / "src" / "maskdino",
}
ALLOWED = {"deform_attn": set(), "coco_eval": set(), "detr_core": {"deform_attn"}, "maskdino": set(PACKAGES)}
# maskdino's folders, lowest first; a module may import its own layer and the ones below.
MASKDINO_LAYERS = [
    {"config", "structures", "cpu_inference", "_deprecated"},
    {"data", "modeling", "checkpoints"},
    {"engine", "inference"},
    {"export"},
    {"cli", "__main__"},
]
# the deprecated aliases of 0.1 module paths re-export upper layers by design
DEPRECATED = {"maskdino.model", "maskdino.checkpoint", "maskdino.convert", "maskdino.allocator", "maskdino.winograd",
              "maskdino.engine.config"}  # fmt: skip


def _modules(pkg: str) -> dict[str, Path]:
    root = PACKAGES[pkg]
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the modules ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph(pkg: str) -> dict[str, set[str]]:
    mods = _modules(pkg)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(name, path):
            # the longest known module the import names (``from .x import y`` may name module x.y or object y)
            parts = imp.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in mods:
                    if cand != name and not (name.startswith(cand + ".") and cand == pkg):
                        deps.add(cand)
                    break
        graph[name] = deps
    return graph


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_packages_import_only_the_layers_below(pkg):
    bad = []
    for name, path in _modules(pkg).items():
        for imp in _imports(name, path):
            top = imp.split(".")[0]
            if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_no_import_cycles(pkg):
    graph = _graph(pkg)
    # a package's __init__ re-exports its modules; only cycles between modules count
    graph = {k: {d for d in v if d != pkg} for k, v in graph.items() if k != pkg and k not in DEPRECATED}
    for name in graph:
        graph[name] = {d for d in graph[name] if d in graph}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            # importing a package's __init__ from inside it is not a cycle between modules
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_maskdino_folders_import_only_lower_layers():
    def layer(mod: str) -> int | None:
        parts = mod.split(".")
        if len(parts) < 2:
            return None
        for i, names in enumerate(MASKDINO_LAYERS):
            if parts[1] in names:
                return i
        return None

    bad = []
    for name, deps in _graph("maskdino").items():
        if name in DEPRECATED:
            continue
        own = layer(name)
        for dep in deps:
            other = layer(dep)
            if own is not None and other is not None and other > own:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad
