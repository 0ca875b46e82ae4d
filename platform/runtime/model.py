"""A tenant's published metadata, compiled once per version for the request path.

Building tables, expression scopes and validators from a bundle takes
milliseconds; a request must not pay that. ``ModelCache`` keeps the compiled
model of each (tenant store, version) and only asks the database which version
is current, and only when the store may have changed since it last asked.
"""

from __future__ import annotations

import functools
import threading
import zoneinfo
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression import Node, Scope, parse
from metacrm.metadata.expressions import scope_for
from metacrm.metadata.model import Bundle, EntityDef, FieldDef, empty_bundle
from metacrm.metadata.tables import build_tables, link_table_name
from metacrm.runtime.changes import Watches, engine_key, meta_topic
from metacrm.runtime.store import TenantStore, meta_version

CACHE_SIZE = 256
#: Stores whose published version a process remembers (one small entry each).
PUBLISHED_CACHE_SIZE = 10_000
#: Longest expression text kept by ``parsed``: metadata expressions and everyday
#: filters fit; a hostile 100 kB filter is parsed (and refused) every time instead.
PARSE_CACHE_TEXT = 4096


@functools.lru_cache(maxsize=2048)
def _parse_cached(text: str) -> Node:
    return parse(text)


def parsed(text: str) -> Node:
    """Return the syntax tree of an expression, parsed once per process for repeated texts.

    Trees are immutable, so a list filtered the same way on every request, or a
    validation rule checked on every write, costs the parser (the slow part of
    an expression) once. Errors are not cached: a bad text raises each time.
    """
    if len(text) > PARSE_CACHE_TEXT:
        return parse(text)
    return _parse_cached(text)


@dataclass(frozen=True, eq=False)
class EntityModel:
    """One entity as the runtime uses it: definition, table, expression scope."""

    entity: EntityDef
    table: sa.Table
    scope: Scope
    links: Mapping[str, sa.Table] = field(default_factory=dict)
    #: Formula fields' parsed expressions: parsed once per published version, because
    #: parsing is the slow part and every list, read and rule check needs them.
    formulas: Mapping[str, Node] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entity.name

    def field(self, name: str) -> FieldDef | None:
        """Return an active (not archived) field, or None."""
        f = self.entity.fields.get(name)
        return f if f is not None and not f.archived else None

    def stored_fields(self) -> list[FieldDef]:
        """Return the active fields that have columns of their own."""
        return [f for f in self.entity.active_fields() if fieldtypes.get(f.type).stored]


@dataclass(frozen=True, eq=False)
class TenantModel:
    """Everything the runtime needs from one published version."""

    version: int
    bundle: Bundle
    metadata: sa.MetaData
    entities: Mapping[str, EntityModel]

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.bundle.doc.get("settings", {})

    @property
    def timezone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.settings.get("timezone", "UTC"))

    def entity(self, name: str) -> EntityModel | None:
        """Return an active entity, or None (archived entities are not reachable)."""
        return self.entities.get(name)


def compile_model(
    version: int, bundle_doc: Mapping[str, Any], metadata: sa.MetaData | None = None
) -> TenantModel:
    """Compile a published bundle into the runtime's model (reusing its tables if built)."""
    bundle = Bundle.from_doc(bundle_doc)
    metadata = metadata if metadata is not None else build_tables(bundle)
    entities = {}
    for entity in bundle.active_entities():
        links = {
            f.name: metadata.tables[link_table_name(entity.name, f.name)]
            for f in entity.active_fields()
            if f.type == "many_to_many"
        }
        formulas = {
            f.name: parsed(f.get("expression"))
            for f in entity.active_fields()
            if f.type == "formula"
        }
        entities[entity.name] = EntityModel(
            entity,
            metadata.tables[entity.name],
            scope_for(bundle.entities, entity.name),
            links,
            formulas,
        )
    return TenantModel(version, bundle, metadata, entities)


#: Built once: every request asks it, and building a statement costs more than its cache hit.
_CURRENT_VERSION = sa.select(sa.func.max(meta_version.c.version))


class ModelCache:
    """Compiled models by (store, version), least recently used dropped first.

    Which version a store has published is read once and then kept while the
    store's change mark (``metacrm.runtime.changes``) stays the same: a request
    then asks the database nothing before its own statement.
    """

    def __init__(self, changes: Watches | None = None, size: int = CACHE_SIZE) -> None:
        self._models: OrderedDict[tuple[str, str | None, int], TenantModel] = OrderedDict()
        self._published: OrderedDict[tuple[str, str | None], tuple[Hashable, int]]
        self._published = OrderedDict()
        self._lock = threading.Lock()
        self._size = size
        self._changes = changes

    def _version(
        self, store: TenantStore, connection: Connection, where: tuple[str, str | None]
    ) -> int:
        """The version published now: from memory while the store's mark holds."""
        mark = None
        if self._changes is not None:
            mark = self._changes.mark(store.engine, meta_topic(store.schema))
        if mark is not None:
            with self._lock:
                known = self._published.get(where)
            if known is not None and known[0] == mark:
                return known[1]
        version = connection.execute(_CURRENT_VERSION).scalar() or 0
        if mark is not None:
            with self._lock:
                self._published[where] = (mark, version)
                self._published.move_to_end(where)
                while len(self._published) > PUBLISHED_CACHE_SIZE:
                    self._published.popitem(last=False)
        return version

    def current(self, store: TenantStore, connection: Connection) -> TenantModel:
        """Return the model of the version published now, compiling it on first use."""
        where = (engine_key(store.engine), store.schema)
        version = self._version(store, connection, where)
        key = (*where, version)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        row = connection.execute(
            sa.select(meta_version.c.bundle).where(meta_version.c.version == version)
        ).first()
        model = compile_model(version, row.bundle if row else empty_bundle())
        with self._lock:
            self._models[key] = model
            while len(self._models) > self._size:
                self._models.popitem(last=False)
        return model
