"""Read a bundle folder (a template such as ``tenants/core``) into one bundle document.

Every file is decoded strictly (``jsondoc``) and checked for its ``kind``;
problems are reported against the file they come from, and the assembled bundle
keeps a map from its JSON pointers back to files so that the validator's
problems can say ``entities/deal.json#/fields/3`` instead of ``/entities/2/fields/3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from metacrm.metadata import jsondoc
from metacrm.metadata.model import BUNDLE_FORMAT
from metacrm.metadata.validation import Problem, schema_problems, validate_bundle

FOLDERS = {
    "entities": "entity",
    "layouts": "layout",
    "pipelines": "pipeline",
    "roles": "role",
    "rules": "rule",
}
SINGLES = {"settings": "settings", "branding": "branding"}
MAX_FILE_BYTES = 2 * 1024 * 1024


@dataclass
class LoadedBundle:
    """A bundle document read from a folder, with where each document came from."""

    doc: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def locate(self, pointer: str) -> str:
        """Translate a bundle pointer into ``file#pointer`` when the file is known."""
        parts = pointer.split("/")
        for depth in (3, 2):
            prefix = "/".join(parts[:depth])
            if prefix in self.sources:
                rest = "/".join(parts[depth:])
                return f"{self.sources[prefix]}#/{rest}" if rest else self.sources[prefix]
        return pointer


def _read(path: Traversable, name: str, problems: list[Problem]) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(name, f"cannot read the file: {exc.strerror or exc}"))
        return None
    try:
        return jsondoc.loads(data, max_bytes=MAX_FILE_BYTES)
    except jsondoc.DocumentError as exc:
        problems.append(Problem(name, str(exc)))
        return None


def load_folder(folder: Traversable | Path | str) -> LoadedBundle:
    """Read a bundle folder; file-level problems are in ``problems``, nothing is raised."""
    root: Traversable = Path(folder) if isinstance(folder, str | Path) else folder
    loaded = LoadedBundle(doc={"format": BUNDLE_FORMAT, "entities": []})
    if not root.is_dir():
        loaded.problems.append(Problem(str(folder), "is not a folder"))
        return loaded
    manifest_file = root / "bundle.json"
    if not manifest_file.is_file():
        loaded.problems.append(
            Problem(
                "bundle.json",
                "is missing: every bundle folder needs "
                "a manifest with its name, version and labels",
            )
        )
    else:
        manifest = _read(manifest_file, "bundle.json", loaded.problems)
        if manifest is not None:
            loaded.problems.extend(
                Problem(f"bundle.json#{p.pointer}", p.message)
                for p in schema_problems(manifest, "manifest")
            )
            if isinstance(manifest, dict):
                loaded.manifest = manifest
    known = {"bundle.json", *(f"{k}.json" for k in SINGLES), *FOLDERS, "sample"}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if (
            entry.name not in known
            and not entry.name.startswith((".", "_"))
            and (entry.name.endswith(".json") or entry.is_dir())
        ):
            expected = ", ".join(f"{k}/" for k in sorted(FOLDERS))
            loaded.problems.append(
                Problem(
                    entry.name,
                    f"is not part of a bundle: documents go "
                    f"in {expected}, settings.json or branding.json",
                )
            )
    for key, kind in SINGLES.items():
        source = root / f"{key}.json"
        if source.is_file():
            doc = _read(source, f"{key}.json", loaded.problems)
            if doc is not None:
                loaded.doc[key] = _expect_kind(doc, kind, f"{key}.json", loaded.problems)
                loaded.sources[f"/{key}"] = f"{key}.json"
    for key, kind in FOLDERS.items():
        sub = root / key
        documents: list[Any] = []
        if sub.is_dir():
            for source in sorted(sub.iterdir(), key=lambda p: p.name):
                if not source.name.endswith(".json"):
                    continue
                name = f"{key}/{source.name}"
                doc = _read(source, name, loaded.problems)
                if doc is None:
                    continue
                loaded.sources[f"/{key}/{len(documents)}"] = name
                documents.append(_expect_kind(doc, kind, name, loaded.problems))
        if documents or key == "entities":
            loaded.doc[key] = documents
    return loaded


def _expect_kind(doc: Any, kind: str, name: str, problems: list[Problem]) -> Any:
    if isinstance(doc, dict):
        if doc.get("kind") != kind:
            problems.append(Problem(f"{name}#/kind", f'must be "{kind}" in this folder'))
        return {k: v for k, v in doc.items() if k != "kind"}
    return doc


def validate_folder(folder: Traversable | Path | str) -> tuple[LoadedBundle, list[Problem]]:
    """Load and validate a bundle folder; problems name the file they are in."""
    loaded = load_folder(folder)
    problems = list(loaded.problems)
    for problem in validate_bundle(loaded.doc):
        problems.append(Problem(loaded.locate(problem.pointer), problem.message, problem.hint))
    return loaded, problems


def template_folder(name: str) -> Traversable:
    """Return the folder of a shipped template (``core`` …); KeyError when unknown."""
    root = resources.files("metacrm.bundles")
    folder = root / name
    if not name.isidentifier() or not folder.is_dir():
        raise KeyError(name)
    return folder


def template_names() -> list[str]:
    """Return the names of the shipped templates."""
    root = resources.files("metacrm.bundles")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "bundle.json").is_file())
