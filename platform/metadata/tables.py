"""Build SQLAlchemy tables from a bundle: one real, typed table per entity.

Tables are built without a schema name; the runtime renders each tenant's
schema through ``schema_translate_map``, so the same ``Table`` objects serve
every tenant with the same metadata and PostgreSQL sees the schema named in
the SQL itself (no reliance on ``search_path``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from metacrm.metadata import fieldtypes
from metacrm.metadata.coltypes import UTCDateTime
from metacrm.metadata.fieldtypes import constraint_name
from metacrm.metadata.model import Bundle, EntityDef, FieldDef


def system_columns() -> list[sa.Column[Any]]:
    """Return fresh copies of the columns every entity table has."""
    return [
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), nullable=True),
        sa.Column("team_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.Uuid(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("deleted_at", UTCDateTime(), nullable=True),
    ]


def link_table_name(entity: str, field_name: str) -> str:
    """Return the name of the link table behind a many-to-many field."""
    return f"{entity}__{field_name}"


def field_columns(f: FieldDef) -> list[sa.Column[Any]]:
    """Return the columns that store one field (none for formulas and relations)."""
    return fieldtypes.get(f.type).columns(f)


def field_indexes(f: FieldDef, table: sa.Table) -> list[sa.Index]:
    """Return the indexes one field asks for: ``indexed``, ``unique``, auto-numbers."""
    ft = fieldtypes.get(f.type)
    if not ft.stored or not ft.indexable:
        return []
    columns = [table.c[name] for name in ft.column_names(f)]
    result = []
    if f.unique or f.type == "auto_number":
        result.append(sa.Index(constraint_name("uq", table.name, f.name), *columns, unique=True))
    elif f.indexed or f.type == "lookup":
        # Lookups are always indexed: related lists and ON DELETE actions scan by them.
        result.append(sa.Index(constraint_name("ix", table.name, f.name), *columns))
    return result


def composite_index(entity: EntityDef, spec: dict[str, Any], table: sa.Table) -> sa.Index:
    """Return one of an entity's declared composite indexes."""
    columns = []
    for name in spec["fields"]:
        if name in table.c:
            columns.append(table.c[name])
        else:
            f = entity.fields[name]
            columns.extend(table.c[c] for c in fieldtypes.get(f.type).column_names(f))
    unique = spec.get("unique", False)
    if not unique:
        # The id tiebreaker of keyset pagination, so a list sorted by the index's last
        # column is served from the index alone (no extra sort step).
        columns.append(table.c.id)
    return sa.Index(constraint_name("ix", entity.name, spec["name"]), *columns, unique=unique)


def entity_table(entity: EntityDef, metadata: sa.MetaData) -> sa.Table:
    """Add the table of one entity to ``metadata`` and return it."""
    columns: list[sa.Column[Any]] = system_columns()
    for f in entity.fields.values():
        columns.extend(field_columns(f))
    table = sa.Table(entity.name, metadata, *columns)
    sa.Index(constraint_name("ix", entity.name, "owner_id"), table.c.owner_id)
    # id ends the index so that keyset pages (ORDER BY created_at, id) read it in order.
    sa.Index(constraint_name("ix", entity.name, "created_at"), table.c.created_at, table.c.id)
    for f in entity.fields.values():
        field_indexes(f, table)  # an Index on a table's columns attaches itself to the table
    for spec in entity.indexes:
        composite_index(entity, spec, table)
    return table


def link_table(f: FieldDef, metadata: sa.MetaData) -> sa.Table:
    """Add the link table of a many-to-many field to ``metadata`` and return it."""
    name = link_table_name(f.entity, f.name)
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "source_id",
            sa.Uuid(),
            sa.ForeignKey(
                f"{f.entity}.id", ondelete="CASCADE", name=constraint_name("fk", name, "s")
            ),
            primary_key=True,
        ),
        sa.Column(
            "target_id",
            sa.Uuid(),
            sa.ForeignKey(
                f"{f.get('target')}.id", ondelete="CASCADE", name=constraint_name("fk", name, "t")
            ),
            primary_key=True,
        ),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Index(constraint_name("ix", name, "target_id"), "target_id"),
    )


def build_tables(bundle: Bundle) -> sa.MetaData:
    """Return a MetaData holding every table the bundle's entities need."""
    metadata = sa.MetaData()
    for entity in bundle.entities.values():
        entity_table(entity, metadata)
    for entity in bundle.entities.values():
        for f in entity.fields.values():
            if f.type == "many_to_many":
                link_table(f, metadata)
    return metadata
