"""The layers stay one-way: ``analysis`` and ``lightning_modules.components`` are the bottom layer.

``experiments`` -> ``lightning_modules``/``datamodules``/``callbacks`` -> ``components``/``analysis``
(docs/design.md, "Layout"). The bottom layer must not import the layers above it or Lightning, so
it can be used (and tested) without datasets, trainers or entry points. Checked by parsing the
source with ``ast`` — nothing is imported, so a violation cannot hide behind an import error or a
lazy import inside a function (every ``import`` statement in the file counts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTOM_LAYER = ("analysis", "lightning_modules/components")
#: Top-level packages the bottom layer must not import.
FORBIDDEN = {"datamodules", "lightning_modules", "experiments", "callbacks", "lightning", "pytorch_lightning"}
#: ...except these, which are the bottom layer themselves.
ALLOWED = ("lightning_modules.components",)


def _package(path: Path) -> list[str]:
    """Dotted package (as parts) that relative imports in ``path`` are resolved against."""
    return list(path.relative_to(REPO).parent.parts)  # same for a module and for a package's __init__.py


def imported_modules(source: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``; ``from m import n`` gives ``m.n``
    (``n`` may be a submodule), relative imports are resolved against ``path``'s package."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package(path)
                base = pkg[: len(pkg) - (node.level - 1)] if node.level - 1 <= len(pkg) else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out += [(node.lineno, f"{module}.{alias.name}" if alias.name != "*" else module) for alias in node.names]
    return sorted(out)


def is_forbidden(module: str) -> bool:
    if module.split(".")[0] not in FORBIDDEN:
        return False
    return not any(module == a or module.startswith(a + ".") for a in ALLOWED)


def violations(path: Path) -> list[str]:
    rel = path.relative_to(REPO)
    return [f"{rel}:{line}: imports {module}" for line, module in imported_modules(path.read_text(), path)
            if is_forbidden(module)]


def bottom_layer_files() -> list[Path]:
    return sorted(p for d in BOTTOM_LAYER for p in (REPO / d).rglob("*.py"))


def test_bottom_layer_files_found():
    files = bottom_layer_files()
    assert any(p.parent.name == "analysis" for p in files)
    assert any("components" in p.parts for p in files)


@pytest.mark.parametrize("path", bottom_layer_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_bottom_layer_imports_nothing_above_it(path: Path):
    found = violations(path)
    assert not found, "the bottom layer imports upwards (docs/design.md, Layout):\n" + "\n".join(found)


def test_checker_catches_upward_imports():
    """The rule itself: absolute, lazy (inside a function) and relative imports that escape the layer."""
    comp = REPO / "lightning_modules" / "components" / "virtues" / "model.py"
    src = (
        "import lightning as L\n"
        "from datamodules.store import DatasetStore\n"
        "def f():\n"
        "    import pytorch_lightning\n"
        "    from experiments import cli\n"
        "from lightning_modules import rosie\n"
        "from ...rosie import RosieModule\n"
        "import callbacks.panels\n"
    )
    bad = [m for _, m in imported_modules(src, comp) if is_forbidden(m)]
    assert bad == ["lightning", "datamodules.store.DatasetStore", "pytorch_lightning", "experiments.cli",
                   "lightning_modules.rosie", "lightning_modules.rosie.RosieModule", "callbacks.panels"]
    ok = (
        "from ..marker_embeddings import load_marker_embeddings\n"
        "from .attention import BACKENDS\n"
        "from lightning_modules.components.virtues.masking import niche_mask\n"
        "from lightning_modules import components\n"
        "import lightning_utilities_not_lightning\n"
        "from analysis.rosie_metrics import evaluate_samples\n"
    )
    assert [m for _, m in imported_modules(ok, comp) if is_forbidden(m)] == []


# ---- seams: no private names across modules, no import circles ----------------------------------------

PACKAGES = ("analysis", "callbacks", "datamodules", "experiments", "lightning_modules", "benchmarks")


def project_files() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (REPO / d).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(path: Path) -> list[str]:
    """``from other.module import _name``: a module reaching into another's private names."""
    own = module_name(path)
    out = []
    for line, module in imported_modules(path.read_text(), path):
        head, _, name = module.rpartition(".")
        if not head or head.split(".")[0] not in PACKAGES or head == own:
            continue
        if name.startswith("_") and not name.startswith("__"):
            out.append(f"{path.relative_to(REPO)}:{line}: imports {name} from {head}")
    return out


def test_no_module_imports_another_modules_private_names() -> None:
    found = [v for p in project_files() for v in private_imports(p)]
    assert not found, "make the seam public or move the code:\n" + "\n".join(found)


def import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (any import statement, lazy ones included)."""
    files = {module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for _, imported in imported_modules(path.read_text(), path):
            target = imported
            while target and target not in files:  # `from pkg.mod import name` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + "."):
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_private_import_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    path = REPO / "experiments" / "virtues_tokens.py"
    src = "def f():\n    from experiments.virtues_reconstruct import _uid\nfrom .commands import _hidden\n"
    found = [m for _, m in imported_modules(src, path)]
    assert "experiments.virtues_reconstruct._uid" in found and "experiments.commands._hidden" in found


def test_no_module_over_500_lines() -> None:
    long = [f"{p.relative_to(REPO)}: {n}" for p in project_files() if (n := len(p.read_text().splitlines())) > 520]
    assert not long, "split these modules by job:\n" + "\n".join(long)
