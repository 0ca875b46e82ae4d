"""The layers point one way: metadata ← runtime ← rules ← ui_builder.

Walks every module's import statements (without importing anything), so a
wrong-way import fails here before it tangles the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "platform"
LAYERS = ["metadata", "runtime", "rules", "ui_builder"]
COMPOSITION_ROOT = {"app.py", "cli.py", "wsgi.py"}
#: Libraries that must not appear in the pure metadata layer.
NOT_IN_METADATA = {"flask", "celery", "redis", "psycopg", "alembic", "werkzeug"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules() -> list[tuple[str, Path]]:
    result = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        layer = relative.parts[0] if len(relative.parts) > 1 else None
        result.append((layer or relative.name, path))
    return result


def test_platform_folder_has_no_init_so_stdlib_platform_is_not_shadowed():
    assert not (ROOT / "__init__.py").exists()
    import platform

    assert hasattr(platform, "python_version")


def test_layers_import_only_downwards():
    wrong = []
    for layer, path in _modules():
        if layer in COMPOSITION_ROOT:
            continue
        assert layer in LAYERS, f"{path} is outside the known layers"
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "platform":
                wrong.append(f"{path}: imports {name}; use metacrm.…")
            if parts[0] != "metacrm" or len(parts) < 2:
                continue
            if parts[1] in LAYERS and parts[1] not in allowed:
                wrong.append(f"{path}: {layer} imports {name}")
            if parts[1] in {"app", "cli", "wsgi"}:
                wrong.append(f"{path}: imports the composition root {name}")
    assert wrong == []


def test_metadata_layer_stays_pure():
    wrong = []
    for layer, path in _modules():
        if layer != "metadata":
            continue
        for name in _imports(path):
            if name.split(".")[0] in NOT_IN_METADATA:
                wrong.append(f"{path}: imports {name}")
    assert wrong == []
