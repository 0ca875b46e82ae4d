"""Quick search (``q=``) over an entity's search fields, and the indexes behind it.

A search matches records where any search field contains the text as a
substring, ignoring case, in any script (so "华联" finds "上海华联贸易有限公司").
The condition is always the plain one, a ``LIKE '%q%'`` per field; an index
only makes it faster, never changes the answer:

- PostgreSQL: ``ILIKE`` backed by a ``pg_trgm`` GIN index per search field.
  Trigram indexes serve patterns of three or more characters; shorter ones
  still work, by scan.
- SQLite: an FTS5 table with the ``trigram`` tokenizer, in external-content
  mode over the entity table and kept in sync by triggers, narrows the rows
  for three or more characters; the ``LIKE`` condition is checked on what it
  finds. The FTS table is keyed by the table's rowid, which a SQLite table
  rebuild renumbers; a rebuild also drops the triggers. The query therefore
  uses the FTS table only while its triggers are in place, and
  ``ensure_search_index`` rebuilds it when they are not.

``ensure_search_index`` is idempotent and cheap when nothing changed; call it
(or ``ensure_search_indexes``) inside the transaction of every publish, and
after a bulk import that ran without the index (``drop_search_index``). On
SQLite nothing else may renumber rowids while the triggers stay: no
``INSERT OR REPLACE`` on entity tables (it skips delete triggers), and
``ensure_search_index`` again after a ``VACUUM``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression.casefold import simple_lower, simple_upper
from metacrm.metadata.expression.construct import FoldLower
from metacrm.metadata.fieldtypes import constraint_name
from metacrm.runtime.model import EntityModel, TenantModel

#: Substrings shorter than this cannot use a trigram index.
TRIGRAM = 3
_ESCAPE = "\\"
_FTS_PREFIX = "_fts_"
_TRIGRAM_INDEX_PREFIX = "trgm"


def search_fields(entity: EntityModel) -> list[str]:
    """Return the columns quick search looks at: the active, stored, text-like search fields."""
    names = []
    for name in entity.entity.doc.get("search_fields", []):
        f = entity.field(name)
        if f is None:
            continue
        ft = fieldtypes.get(f.type)
        if ft.stored and ft.text_like and ft.column_names(f) == [name]:
            names.append(name)
    return names


def like_pattern(text: str) -> str:
    """Return a LIKE pattern (escape character ``\\``) matching ``text`` anywhere."""
    escaped = text.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%")
    return "%" + escaped.replace("_", _ESCAPE + "_") + "%"


def search_condition(
    connection: Connection, entity: EntityModel, text: str
) -> sa.ColumnElement[bool] | None:
    """Return the WHERE condition of a quick search; None when the entity has no search fields."""
    names = search_fields(entity)
    if not names:
        return None
    columns = [entity.table.c[name] for name in names]
    if connection.dialect.name != "sqlite":
        pattern = like_pattern(text)
        # PostgreSQL's LIKE escape character is the backslash already.
        return sa.or_(*(column.ilike(pattern) for column in columns))
    condition = _sqlite_like(columns, text)
    if len(text) >= TRIGRAM and _fts_ready(connection, entity):
        name = fts_table_name(entity.name)
        fts = sa.table(name, sa.column("rowid"), sa.column(name))
        phrase = '"' + text.replace('"', '""') + '"'
        rowids = sa.select(fts.c.rowid).where(fts.c[name].op("MATCH")(phrase))
        # Unqualified: the list's FROM holds the entity table alone (lookup hops are
        # subqueries with FROMs of their own), and no field can be named _rowid_.
        own_rowid: sa.ColumnElement[Any] = sa.literal_column("_rowid_")
        condition = sa.and_(own_rowid.in_(rowids), condition)
    return condition


def _sqlite_like(columns: list[sa.Column[Any]], text: str) -> sa.ColumnElement[bool]:
    """LIKE per column, folding case the way the expression language does.

    SQLite's own LIKE folds only ASCII; that is enough, and much faster than a
    Python function per row, when no character of the text has another case
    outside ASCII (Chinese, digits, ASCII letters).
    """
    if all(c.isascii() or simple_lower(c) == c == simple_upper(c) for c in text):
        pattern = like_pattern(text)
        return sa.or_(*(column.like(pattern, escape=_ESCAPE) for column in columns))
    pattern = like_pattern(simple_lower(text))
    return sa.or_(*(FoldLower(column).like(pattern, escape=_ESCAPE) for column in columns))


# -- indexes ----------------------------------------------------------------------------


def fts_table_name(entity_name: str) -> str:
    """Return the name of an entity's FTS5 table on SQLite."""
    return f"{_FTS_PREFIX}{entity_name}"


def trigram_index_name(entity_name: str, field_name: str) -> str:
    """Return the name of the trigram index of one search field on PostgreSQL."""
    return constraint_name(_TRIGRAM_INDEX_PREFIX, entity_name, field_name)


def ensure_search_index(connection: Connection, model: TenantModel, entity: EntityModel) -> bool:
    """Create or repair the index behind an entity's quick search; True when one is in place.

    Run it inside a transaction (the publish's own is right). On PostgreSQL it
    creates ``pg_trgm`` when permitted (search then works by scan when not) and
    builds one GIN index per search field, dropping those of fields that are no
    longer searched; ``CREATE INDEX`` blocks writes to the table while it runs.
    On SQLite it (re)creates the FTS5 table and its triggers when they differ
    from what the search fields need, and fills the table from the records.
    """
    if connection.dialect.name == "sqlite":
        return _ensure_fts(connection, entity)
    return _ensure_trigram(connection, entity)


def drop_search_index(connection: Connection, entity: EntityModel) -> None:
    """Drop the index behind an entity's quick search; search keeps working, by scan.

    Keeping a trigram index costs every insert several times over (measured:
    200,000 rows took 4.6x as long on PostgreSQL with three GIN trigram indexes,
    and SQLite's FTS triggers made inserts about 10x slower), so a bulk import
    drops it first and calls ``ensure_search_index`` after, which builds it
    from the records in one pass.
    """
    if connection.dialect.name == "sqlite":
        _drop_fts(connection, entity.name)
        return
    schema = _schema(connection)
    for name in _trigram_indexes(connection, schema, entity.table.name):
        _drop_index(connection, schema, name)


def ensure_search_indexes(
    connection: Connection, model: TenantModel, skip: Collection[str] = ()
) -> None:
    """Ensure the search index of every active entity, and drop FTS tables of purged ones.

    ``skip`` names entities already handled in this transaction (tables just made
    with ``new_table_search_ddl``), which need no catalog lookups.
    """
    for entity in model.entities.values():
        if entity.name not in skip:
            ensure_search_index(connection, model, entity)
    if connection.dialect.name == "sqlite":
        rows = connection.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL%'"
        ).all()
        for (name,) in rows:
            owner = name[len(_FTS_PREFIX) :] if name.startswith(_FTS_PREFIX) else None
            if owner and owner not in model.bundle.entities:
                _drop_fts(connection, owner)


def new_table_search_ddl(
    connection: Connection, model: TenantModel, created: Collection[str]
) -> list[str]:
    """Return the DDL giving tables created in this transaction their search indexes.

    A table made in the same transaction has no search index yet, so the catalog
    lookups of ``ensure_search_index`` are skipped (a tenant's first publish made
    one per entity) and the caller can send these statements in the same batch as
    the tables. They are the statements ``ensure_search_index`` would run: on
    PostgreSQL the trigram indexes (none when pg_trgm is not available), on SQLite
    the FTS5 table and its triggers (an empty table needs no 'rebuild').
    """
    entities = [model.entities[name] for name in created if name in model.entities]
    if connection.dialect.name == "sqlite":
        return [
            sql
            for entity in entities
            if _fts_fields(entity)
            for sql in _fts_statements(entity.name, _fts_fields(entity)).values()
        ]
    wanted = [(entity, search_fields(entity)) for entity in entities]
    if not any(names for _, names in wanted):
        return []
    extension = _trigram_schema(connection)
    if extension is None:
        return []
    schema = _schema(connection)
    return [
        _trigram_ddl(schema, entity.table.name, name, column, extension)
        for entity, names in wanted
        for name, column in sorted((trigram_index_name(entity.name, n), n) for n in names)
    ]


# -- PostgreSQL: pg_trgm ----------------------------------------------------------------


def _trigram_schema(connection: Connection) -> str | None:
    """Return the schema pg_trgm lives in, creating the extension when permitted."""
    find = sa.text("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = :n")
    found = connection.execute(find, {"n": "pg_trgm"}).scalar()
    if found is not None:
        return str(found)
    try:
        with connection.begin_nested():
            connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError:
        # No privilege, or not installed: quick search still works, by scan.
        return None
    found = connection.execute(find, {"n": "pg_trgm"}).scalar()
    return None if found is None else str(found)


def _schema(connection: Connection) -> str | None:
    translate = connection.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(None)
    return schema if isinstance(schema, str) else None


def _trigram_indexes(connection: Connection, schema: str | None, table: str) -> set[str]:
    # Look the table up by OID through the catalog's own indexes: the pg_indexes view
    # scans pg_class, which grows with every tenant's tables on a shared server.
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    rows = connection.execute(
        sa.text(
            # The sub-select pins the plan to pg_index's indrelid index; a bare
            # LIKE would let it range-scan every tenant's trigram index names.
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = (SELECT to_regclass(:qualified))::oid "
            "AND c.relname || '' LIKE :prefix"
        ),
        {"qualified": qualified, "prefix": _TRIGRAM_INDEX_PREFIX + r"\_%"},
    )
    return {row[0] for row in rows}


def _drop_index(connection: Connection, schema: str | None, name: str) -> None:
    index = f'"{schema}"."{name}"' if schema else f'"{name}"'
    connection.exec_driver_sql(f"DROP INDEX IF EXISTS {index}")


def _trigram_ddl(schema: str | None, table: str, name: str, column: str, extension: str) -> str:
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    return (
        f'CREATE INDEX IF NOT EXISTS "{name}" ON {qualified} '
        f'USING gin ("{column}" "{extension}".gin_trgm_ops)'
    )


def _ensure_trigram(connection: Connection, entity: EntityModel) -> bool:
    schema = _schema(connection)
    wanted = {trigram_index_name(entity.name, name): name for name in search_fields(entity)}
    existing = _trigram_indexes(connection, schema, entity.table.name)
    for name in sorted(existing - set(wanted)):
        _drop_index(connection, schema, name)
    if not wanted:
        return False
    missing = {name: column for name, column in wanted.items() if name not in existing}
    if not missing:
        return True
    extension = _trigram_schema(connection)
    if extension is None:
        return False
    for name, column in sorted(missing.items()):
        connection.exec_driver_sql(_trigram_ddl(schema, entity.table.name, name, column, extension))
    return True


# -- SQLite: FTS5 with the trigram tokenizer --------------------------------------------


def _fts_statements(entity_name: str, names: list[str]) -> dict[str, str]:
    """Return the CREATE statements of the FTS table and its triggers, by object name.

    External content means FTS5 reads the entity table by the FTS column
    names, so those are the field names; the entity's rowid is read as
    ``_rowid_``, which no metadata identifier can shadow.
    """
    fts = fts_table_name(entity_name)
    cols = ", ".join(f'"{n}"' for n in names)
    new = ", ".join(f'new."{n}"' for n in names)
    old = ", ".join(f'old."{n}"' for n in names)
    insert = f'INSERT INTO "{fts}"(rowid, {cols}) VALUES (new._rowid_, {new});'
    delete = f'INSERT INTO "{fts}"("{fts}", rowid, {cols}) VALUES (\'delete\', old._rowid_, {old});'
    return {
        fts: (
            f"CREATE VIRTUAL TABLE \"{fts}\" USING fts5({cols}, content='{entity_name}', "
            "content_rowid='_rowid_', tokenize='trigram')"
        ),
        f"{fts}_ai": f'CREATE TRIGGER "{fts}_ai" AFTER INSERT ON "{entity_name}" '
        f"BEGIN {insert} END",
        f"{fts}_ad": f'CREATE TRIGGER "{fts}_ad" AFTER DELETE ON "{entity_name}" '
        f"BEGIN {delete} END",
        f"{fts}_au": (
            f'CREATE TRIGGER "{fts}_au" AFTER UPDATE OF {cols} ON "{entity_name}" '
            f"BEGIN {delete} {insert} END"
        ),
    }


def _fts_fields(entity: EntityModel) -> list[str]:
    """Return the search fields FTS5 can index: all, unless one is named like FTS5's own columns."""
    names = search_fields(entity)
    return [] if {"rank", "rowid"} & set(names) else names


def _stored_statements(connection: Connection, names: list[str]) -> dict[str, str]:
    placeholders = ", ".join("?" for _ in names)
    rows = connection.exec_driver_sql(
        f"SELECT name, sql FROM sqlite_master WHERE name IN ({placeholders})", tuple(names)
    ).all()
    return {name: sql for name, sql in rows}


def _fts_ready(connection: Connection, entity: EntityModel) -> bool:
    """Tell whether the FTS table and its triggers are exactly what the search fields need."""
    names = _fts_fields(entity)
    if not names:
        return False
    wanted = _fts_statements(entity.name, names)
    return _stored_statements(connection, list(wanted)) == wanted


def _drop_fts(connection: Connection, entity_name: str) -> None:
    fts = fts_table_name(entity_name)
    for suffix in ("_ai", "_ad", "_au"):
        connection.exec_driver_sql(f'DROP TRIGGER IF EXISTS "{fts}{suffix}"')
    connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{fts}"')


def _ensure_fts(connection: Connection, entity: EntityModel) -> bool:
    names = _fts_fields(entity)
    if not names:
        _drop_fts(connection, entity.name)
        return False
    wanted = _fts_statements(entity.name, names)
    if _stored_statements(connection, list(wanted)) == wanted:
        return True
    # Anything missing or different (a table rebuild dropped the triggers and
    # renumbered rowids, the search fields changed): start again from the records.
    _drop_fts(connection, entity.name)
    for sql in wanted.values():
        connection.exec_driver_sql(sql)
    fts = fts_table_name(entity.name)
    connection.exec_driver_sql(f'INSERT INTO "{fts}"("{fts}") VALUES (\'rebuild\')')
    return True
