"""Typed, read-only views over validated metadata documents.

The documents themselves stay the source of truth (they are what is stored and
diffed); ``EntityDef`` and ``FieldDef`` give the rest of the code names instead
of dictionary keys. Build them only from documents that passed validation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

BUNDLE_FORMAT = 1
DOCUMENT_LISTS = ("entities", "layouts", "pipelines", "roles", "rules")


@dataclass(frozen=True, eq=False)
class FieldDef:
    """One field of an entity, as its document describes it."""

    entity: str
    doc: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def type(self) -> str:
        return self.doc["type"]

    @property
    def label(self) -> Mapping[str, str]:
        return self.doc["label"]

    @property
    def required(self) -> bool:
        return bool(self.doc.get("required", False))

    @property
    def unique(self) -> bool:
        return bool(self.doc.get("unique", False))

    @property
    def indexed(self) -> bool:
        return bool(self.doc.get("indexed", False))

    @property
    def read_only(self) -> bool:
        return bool(self.doc.get("read_only", False))

    @property
    def archived(self) -> bool:
        return bool(self.doc.get("archived", False))

    @property
    def has_default(self) -> bool:
        return "default" in self.doc

    @property
    def default(self) -> Any:
        return self.doc.get("default")

    def get(self, key: str, default: Any = None) -> Any:
        """Return a type-specific key of the document."""
        return self.doc.get(key, default)

    @property
    def path(self) -> str:
        return f"{self.entity}.{self.name}"


@dataclass(frozen=True, eq=False)
class EntityDef:
    """One entity: a table, an API resource, a set of screens."""

    doc: Mapping[str, Any]
    fields: Mapping[str, FieldDef] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> EntityDef:
        """Build the definition of one validated entity document."""
        fields = {f["name"]: FieldDef(doc["name"], f) for f in doc.get("fields", [])}
        return cls(doc=doc, fields=fields)

    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def label(self) -> Mapping[str, str]:
        return self.doc["label"]

    @property
    def archived(self) -> bool:
        return bool(self.doc.get("archived", False))

    @property
    def title_field(self) -> str:
        return self.doc["title_field"]

    @property
    def indexes(self) -> list[Mapping[str, Any]]:
        return list(self.doc.get("indexes", []))

    def active_fields(self) -> Iterator[FieldDef]:
        """Yield the fields that are not archived, in document order."""
        return (f for f in self.fields.values() if not f.archived)


@dataclass(frozen=True, eq=False)
class Bundle:
    """A tenant's whole metadata: the unit that is validated, planned and published."""

    doc: Mapping[str, Any]
    entities: Mapping[str, EntityDef]

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Bundle:
        """Build the definitions of one validated bundle document."""
        entities = {e["name"]: EntityDef.from_doc(e) for e in doc.get("entities", [])}
        return cls(doc=doc, entities=entities)

    def documents(self, kind: str) -> list[Mapping[str, Any]]:
        """Return the documents of one list kind (``layouts``, ``roles`` …)."""
        return list(self.doc.get(kind, []))

    def active_entities(self) -> Iterator[EntityDef]:
        """Yield the entities that are not archived."""
        return (e for e in self.entities.values() if not e.archived)

    def to_json(self) -> dict[str, Any]:
        """Return a deep copy of the document, safe to change and to store."""
        return copy.deepcopy(dict(self.doc))


def empty_bundle() -> dict[str, Any]:
    """Return the bundle of a tenant that has published nothing yet."""
    return {"format": BUNDLE_FORMAT, "entities": []}
