"""The shape of the code: imports point one way, no import circle, short functions in train/."""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGES = ("edge", "server", "train", "quantize", "benchmarks")
# Which packages each may import: edge at the bottom, benchmarks reads everything.
MAY_IMPORT = {"edge": {"edge"}, "server": {"edge", "server"}, "train": {"edge", "train"},
              "quantize": {"edge", "train", "quantize"}, "benchmarks": set(PACKAGES)}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{root}.{base}" if base else root
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in g[node]:
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(trail + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2
    for node in g:
        if node not in state:
            visit(node, [node])


def test_imports_point_down_the_layers():
    for name, targets in graph().items():
        pkg = name.split(".")[0]
        for t in targets:
            assert t.split(".")[0] in MAY_IMPORT[pkg], f"{name} imports {t}"


def test_nothing_imports_quantize_internals_from_the_training_loop():
    g = graph()
    assert not any("train.loop" in targets for name, targets in g.items() if not name.startswith("train."))
    assert g["train.evaluate"].isdisjoint({"train.loop", "train.pipeline"})


def test_functions_in_train_are_short():
    longest = max(((n.end_lineno - n.lineno + 1, f"{p.name}:{n.name}") for p in (REPO / "train").glob("*.py")
                   for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)))
    assert longest[0] < 60, longest


def test_train_loop_holds_only_the_loop():
    defs = {n.name for n in ast.parse((REPO / "train" / "loop.py").read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defs <= {"TrainingData", "Progress", "restore", "run_epoch", "validate", "fine_tune"}, defs
