"""The JSON Schemas (Draft 2020-12) of every metadata document kind, shipped in the package."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

BASE_URI = "https://metacrm.dev/schemas/"
KINDS = (
    "bundle",
    "manifest",
    "entity",
    "field",
    "layout",
    "pipeline",
    "role",
    "rule",
    "branding",
    "settings",
    "common",
)


@functools.cache
def _documents() -> dict[str, dict[str, Any]]:
    folder = resources.files("metacrm.metadata") / "schemas"
    return {kind: json.loads((folder / f"{kind}.json").read_text("utf-8")) for kind in KINDS}


@functools.cache
def _registry() -> Registry:
    # No retrieve function: an unknown $ref fails instead of fetching anything.
    return (
        Registry()
        .with_resources(
            (doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012))
            for doc in _documents().values()
        )
        .crawl()
    )


def schema(kind: str) -> dict[str, Any]:
    """Return the JSON Schema of one document kind; KeyError for an unknown kind."""
    return _documents()[kind]


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    """Return a validator for one document kind, with references to the other kinds resolved."""
    return Draft202012Validator(schema(kind), registry=_registry())
