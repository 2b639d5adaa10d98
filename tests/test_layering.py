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
