"""Build SQLAlchemy tables from a bundle: one real, typed table per entity.

Tables are built without a schema name; the runtime renders each tenant's
schema through ``schema_translate_map``, so the same ``Table`` objects serve
every tenant with the same metadata and PostgreSQL sees the schema named in
the SQL itself (no reliance on ``search_path``).

The layout follows decision record 0012: columns are declared widest fixed
width first (PostgreSQL pads each value to its alignment, so a ``bigint``
after text costs up to 7 bytes a row), and the indexes that serve lists are
partial, ``WHERE deleted_at IS NULL``, as every live list says, so a count
or a filter is answered from the index alone. Unique indexes (their rule
holds for soft-deleted records too) and lookup indexes (the foreign keys'
``ON DELETE`` actions scan them without that condition) stay whole; the
recycle bin has a small index of its own. The indexes that serve keyset pages
end with the ``id`` tiebreaker on SQLite only (decision record 0020).
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


def storage_rank(column: sa.Column[Any]) -> int:
    """Return where a column goes in its table: fixed widths, widest first, then the rest.

    PostgreSQL lays a row out in declared order and pads each fixed-width value
    to its alignment: UUIDs (16 bytes, no alignment) first, then 8-, 4-, 2- and
    1-byte values, then variable-length ones (text, numeric, JSON). SQLite
    stores every value in as few bytes as it needs, so the order costs it nothing.
    """
    kind = column.type
    if isinstance(kind, sa.types.TypeDecorator):
        kind = kind.impl_instance
    if isinstance(kind, sa.Uuid):
        return 0
    if isinstance(kind, sa.DateTime | sa.BigInteger | sa.Float | sa.Time | sa.Interval):
        return 1  # subclasses of Integer and Numeric: checked before those
    if isinstance(kind, sa.SmallInteger):
        return 3
    if isinstance(kind, sa.Integer | sa.Date):
        return 2
    if isinstance(kind, sa.Boolean):
        return 4
    return 5


def live_rows_only(table: sa.Table) -> dict[str, Any]:
    """Return the options that make an index partial: only live (not soft-deleted) rows."""
    live = table.c.deleted_at.is_(None)
    return {"postgresql_where": live, "sqlite_where": live}


#: Key of ``Index.info`` naming the one backend an index is for (see :func:`keyset_index`).
BACKEND = "metacrm.backend"


def keyset_index(name: str, table: sa.Table, *columns: sa.Column[Any]) -> None:
    """Add a live-rows index for lists sorted by its last column, in each backend's shape.

    Keyset pages sort by the list's columns and then ``id``, so that the order is
    total. SQLite gets ``id`` as the index's last column, and reads a page in order
    from the index; without it SQLite sorts each page's rows again ("TEMP B-TREE FOR
    RIGHT PART OF ORDER BY"), two to three times the page's cost. PostgreSQL gets the
    index without it: its incremental sort orders only rows whose other columns are
    equal, at about 0.05 ms a page, and each entry is 16 bytes smaller (decision
    record 0020). Both are attached to ``table`` under one name, each created only
    on its own backend (``ddl_if``; :func:`backend_indexes` for compiled DDL).
    """
    live = live_rows_only(table)
    sqlite = sa.Index(name, *columns, table.c.id, info={BACKEND: "sqlite"}, **live)
    sqlite.ddl_if(dialect="sqlite")
    postgresql = sa.Index(name, *columns, info={BACKEND: "postgresql"}, **live)
    postgresql.ddl_if(dialect="postgresql")


def backend_indexes(table: sa.Table, dialect: str) -> list[sa.Index]:
    """Return the indexes ``table`` has on the backend ``dialect`` names, by name."""
    indexes = [i for i in table.indexes if i.info.get(BACKEND, dialect) == dialect]
    return sorted(indexes, key=lambda index: str(index.name))


def link_table_name(entity: str, field_name: str) -> str:
    """Return the name of the link table behind a many-to-many field."""
    return f"{entity}__{field_name}"


def field_columns(f: FieldDef) -> list[sa.Column[Any]]:
    """Return the columns that store one field (none for formulas and relations)."""
    return fieldtypes.get(f.type).columns(f)


def field_indexes(f: FieldDef, table: sa.Table) -> list[sa.Index]:
    """Return the indexes one field asks for: ``indexed``, ``unique``, auto-numbers.

    A unique index covers every row (a soft-deleted record keeps its value, so a
    restore cannot clash); a lookup's index too, as ``ON DELETE`` scans it for
    deleted and live rows alike. An ``indexed`` field's index holds live rows only.
    """
    ft = fieldtypes.get(f.type)
    if not ft.stored or not ft.indexable:
        return []
    columns = [table.c[name] for name in ft.column_names(f)]
    result = []
    if f.unique or f.type == "auto_number":
        result.append(sa.Index(constraint_name("uq", table.name, f.name), *columns, unique=True))
    elif f.type == "lookup":
        # Lookups are always indexed: related lists and ON DELETE actions scan by them.
        result.append(sa.Index(constraint_name("ix", table.name, f.name), *columns))
    elif f.indexed:
        result.append(
            sa.Index(constraint_name("ix", table.name, f.name), *columns, **live_rows_only(table))
        )
    return result


def composite_index(entity: EntityDef, spec: dict[str, Any], table: sa.Table) -> None:
    """Add one of an entity's declared composite indexes to ``table``."""
    columns = []
    for name in spec["fields"]:
        if name in table.c:
            columns.append(table.c[name])
        else:
            f = entity.fields[name]
            columns.extend(table.c[c] for c in fieldtypes.get(f.type).column_names(f))
    name = constraint_name("ix", entity.name, spec["name"])
    if spec.get("unique", False):
        sa.Index(name, *columns, unique=True)
    else:
        keyset_index(name, table, *columns)


def entity_table(entity: EntityDef, metadata: sa.MetaData) -> sa.Table:
    """Add the table of one entity to ``metadata`` and return it."""
    columns: list[sa.Column[Any]] = system_columns()
    for f in entity.fields.values():
        columns.extend(field_columns(f))
    # A stable sort: columns of one width keep their order (system columns, then fields).
    table = sa.Table(entity.name, metadata, *sorted(columns, key=storage_rank))
    live = live_rows_only(table)
    sa.Index(constraint_name("ix", entity.name, "owner_id"), table.c.owner_id, **live)
    keyset_index(constraint_name("ix", entity.name, "created_at"), table, table.c.created_at)
    # The recycle bin (deleted=true lists) finds its rows here; it holds only those.
    bin_rows = table.c.deleted_at.is_not(None)
    sa.Index(
        constraint_name("ix", entity.name, "deleted_at"),
        table.c.deleted_at,
        postgresql_where=bin_rows,
        sqlite_where=bin_rows,
    )
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
