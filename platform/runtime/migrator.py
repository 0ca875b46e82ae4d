"""Check a migration plan against a tenant's data, and apply it with the right DDL.

Both run inside the caller's transaction, so a refused or failed publish leaves
schema, data and metadata exactly as they were. PostgreSQL gets direct
``ALTER TABLE`` statements (adding a nullable column never rewrites the table).
SQLite cannot alter a column's type or nullability, so such tables are rebuilt
with its documented copy-and-rename procedure, once per table, after the cheap
operations; the caller turns foreign-key enforcement off around the
transaction, as that procedure requires, and checks the keys before commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.engine import Connection

from metacrm.metadata import fieldtypes
from metacrm.metadata.conversions import conversion
from metacrm.metadata.fieldtypes import ON_DELETE, ValueProblem, constraint_name
from metacrm.metadata.model import Bundle, FieldDef
from metacrm.metadata.plan import Operation, Plan
from metacrm.metadata.tables import (
    backend_indexes,
    build_tables,
    field_indexes,
    link_table_name,
)
from metacrm.runtime.model import compile_model
from metacrm.runtime.search import ensure_search_indexes, new_table_search_ddl
from metacrm.runtime.store import DDL_CACHE, run_ddl, table_ddl

SAMPLE_SIZE = 10
#: Operations that change how an existing column is stored: SQLite rebuilds the table.
_REBUILD_ON_SQLITE = {
    "change_type",
    "set_required",
    "drop_required",
    "change_on_delete",
    "purge_field",
}


@dataclass(frozen=True)
class CheckFailure:
    """Why one operation cannot be applied to the data as it is."""

    operation: int
    description: str
    message: str
    count: int
    sample_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the failure as the API and CLI show it."""
        return {
            "operation": self.operation,
            "description": self.description,
            "message": self.message,
            "count": self.count,
            "sample_ids": self.sample_ids,
        }


class DataCheckFailed(Exception):
    """Raised when the data refuses a plan; ``failures`` names the rows."""

    def __init__(self, failures: list[CheckFailure]) -> None:
        super().__init__("; ".join(f.message for f in failures))
        self.failures = failures


def _field(op: Operation, key: str = "doc") -> FieldDef:
    return FieldDef(op.entity or "", op.params[key])


def _columns(table: sa.Table, f: FieldDef) -> list[sa.Column[Any]]:
    return [table.c[name] for name in fieldtypes.get(f.type).column_names(f)]


def _sample(connection: Connection, query: sa.Select[Any]) -> list[str]:
    return [str(row[0]) for row in connection.execute(query.limit(SAMPLE_SIZE))]


def check_plan(connection: Connection, old: Bundle, plan: Plan) -> list[CheckFailure]:
    """Return what in the stored data prevents the plan; an empty list means it applies."""
    tables = build_tables(old)
    failures: list[CheckFailure] = []

    def fail(index: int, op: Operation, message: str, count: int, ids: list[str]) -> None:
        failures.append(CheckFailure(index, op.description, message, count, ids))

    for index, op in enumerate(plan.operations):
        if not op.risky or op.entity not in tables.tables:
            continue
        table = tables.tables[op.entity]
        if op.kind == "add_field":
            count = connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            if count:
                ids = _sample(connection, sa.select(table.c.id))
                fail(
                    index,
                    op,
                    f"'{op.entity}.{op.field}' is required and has no default, but "
                    f"{count} record(s) exist: give it a default or make it optional",
                    count,
                    ids,
                )
        elif op.kind == "set_required":
            f = _field(op)
            if f.has_default:
                continue
            empty = sa.or_(*(c.is_(None) for c in _columns(table, f)))
            count = connection.execute(
                sa.select(sa.func.count()).select_from(table).where(empty)
            ).scalar_one()
            if count:
                ids = _sample(connection, sa.select(table.c.id).where(empty))
                fail(
                    index,
                    op,
                    f"{count} record(s) have no value in '{op.entity}.{op.field}': "
                    "fill them or give the field a default",
                    count,
                    ids,
                )
        elif op.kind in ("add_field_index", "add_index"):
            if op.kind == "add_field_index":
                names = fieldtypes.get(_field(op).type).column_names(_field(op))
            else:
                names = list(op.params["index"]["fields"])
            if any(name not in table.c for name in names):
                continue
            columns = [table.c[name] for name in names]
            dupes = (
                sa.select(*columns)
                .where(*(c.is_not(None) for c in columns))
                .group_by(*columns)
                .having(sa.func.count() > 1)
                .subquery()
            )
            count = connection.execute(sa.select(sa.func.count()).select_from(dupes)).scalar_one()
            if count:
                match = sa.and_(*(table.c[n] == dupes.c[n] for n in names))
                ids = _sample(connection, sa.select(table.c.id).join(dupes, match))
                fail(
                    index,
                    op,
                    f"{count} value(s) of {', '.join(names)} occur more than once, so "
                    "they cannot be made unique",
                    count,
                    ids,
                )
        elif op.kind == "change_type":
            failure = _check_conversion(connection, table, op)
            if failure:
                fail(index, op, *failure)
    return failures


def _check_conversion(
    connection: Connection, table: sa.Table, op: Operation
) -> tuple[str, int, list[str]] | None:
    old, new = _field(op, "old"), _field(op)
    rule = conversion(old, new)
    if rule is None or rule.always:
        return None
    column = table.c[old.name]
    count, ids, first = 0, [], ""
    rows = connection.execute(
        sa.select(table.c.id, column).where(column.is_not(None)),
        execution_options={"yield_per": 2000},
    )
    for row_id, value in rows:
        try:
            rule.convert(value)
        except (ValueProblem, ValueError, TypeError, ArithmeticError) as exc:
            count += 1
            if len(ids) < SAMPLE_SIZE:
                ids.append(str(row_id))
            first = first or str(exc)
    if not count:
        return None
    return (
        f"{count} record(s) of '{op.entity}' hold a value of '{op.field}' that is not a valid "
        f"{new.type} (for example: {first})",
        count,
        ids,
    )


class PreparedPlan:
    """A plan from the empty bundle with its tables and model built once, for many namespaces.

    Every tenant created from a template gets the same plan. Building its tables
    (~9 ms of Python for ``core``), its model, and compiling its DDL (cached in the
    tables' ``info``, see ``store.DDL_CACHE``) once per process instead of once per
    tenant is most of the Python a creation costs. Only plans whose operations need
    no handler beyond creating tables qualify, so applying one never changes these
    objects and one instance serves concurrent creations.
    """

    def __init__(self, plan: Plan) -> None:
        handled = [op.kind for op in plan.operations if hasattr(_Applier, f"do_{op.kind}")]
        if handled:
            raise ValueError(f"only plans that create entities can be prepared, not {handled}")
        self.plan = plan
        self.bundle = Bundle.from_doc(plan.result)
        self.metadata = build_tables(self.bundle)
        self.metadata.info[DDL_CACHE] = {}
        self.model = compile_model(0, plan.result, self.metadata)
        #: The operations as the version row stores them.
        self.operations = [op.to_dict() for op in plan.operations]


class _Applier:
    def __init__(
        self,
        connection: Connection,
        schema: str | None,
        old: Bundle,
        plan: Plan,
        prepared: PreparedPlan | None = None,
    ) -> None:
        self.conn = connection
        self.schema = schema
        self.sqlite = connection.dialect.name == "sqlite"
        self.old_md = build_tables(old)
        self.old_md.info["bundle"] = old.doc
        self.old_md.info["bundle_def"] = old
        self.plan = plan
        if prepared is not None:
            self.new, self.new_md, self.model = prepared.bundle, prepared.metadata, prepared.model
        else:
            self.new = Bundle.from_doc(plan.result)
            self.new_md = build_tables(self.new)
            self.model = compile_model(0, plan.result, self.new_md)
        self.ops = Operations(MigrationContext.configure(connection))
        self.rebuild: dict[str, dict[str, Operation]] = {}
        #: Entities whose tables (and search indexes) this publish creates.
        self.created = [op.entity or "" for op in plan.operations if op.kind == "create_entity"]

    def run(self) -> None:
        if self.created:
            tables = [self.new_md.tables[name] for name in self.created]
            for name in self.created:
                tables.extend(
                    self.new_md.tables[link_table_name(name, f.name)]
                    for f in self.new.entities[name].fields.values()
                    if f.type == "many_to_many"
                )
            self.create_tables(tables)
        for op in self.plan.operations:
            handler = getattr(self, f"do_{op.kind}", None)
            if handler is not None:
                handler(op)
        for table_name, conversions in self.rebuild.items():
            self.rebuild_sqlite_table(table_name, conversions)
        # Search indexes follow the new shape in the same transaction (a SQLite
        # table rebuild drops the triggers that keep them in sync).
        ensure_search_indexes(self.conn, self.model, skip=self.created)

    def create_tables(self, tables: list[sa.Table]) -> None:
        """Create new tables with their indexes and search indexes, in foreign-key order.

        They go in one batch on PostgreSQL; the search indexes of a new table need
        no look at the catalog first.
        """
        statements = table_ddl(self.conn.dialect, self.new_md, tables, self.schema)
        statements += new_table_search_ddl(self.conn, self.model, self.created)
        run_ddl(self.conn, statements)

    # -- adding ---------------------------------------------------------------------------

    def do_add_field(self, op: Operation) -> None:
        table = self.new_md.tables[op.entity]
        f = self.new.entities[op.entity].fields[op.field]
        for column in _columns(table, f):
            if self.sqlite:
                self.add_sqlite_column(op, f, column)
            else:
                fill_later = column.server_default is None and not column.nullable
                plain = sa.Column(
                    column.name,
                    column.type,
                    nullable=column.nullable or fill_later,
                    server_default=column.server_default,
                )
                self.ops.add_column(op.entity, plain, schema=self.schema)
        if f.type == "lookup" and not self.sqlite:
            self._create_foreign_key(op.entity, f)
        if not self.sqlite:
            self._fill_default(op, f)

    def _create_foreign_key(self, entity: str, f: FieldDef) -> None:
        self.ops.create_foreign_key(
            constraint_name("fk", entity, f.name),
            entity,
            f.get("target"),
            [f.name],
            ["id"],
            ondelete=ON_DELETE[f.get("on_delete", "set_null")],
            source_schema=self.schema,
            referent_schema=self.schema,
        )

    def _fill_default(self, op: Operation, f: FieldDef) -> None:
        """Give existing rows the default of a new required field whose default is no literal.

        Scalar defaults are server defaults (no rewrite); a list or object default is
        written by UPDATE and the column made NOT NULL afterwards.
        """
        if not (f.required and f.has_default) or f.default is None:
            return
        table = self.new_md.tables[op.entity]
        column = table.c[f.name]
        if column.server_default is not None:
            return
        value = fieldtypes.get(f.type).coerce(f, f.default)
        self.conn.execute(sa.update(table).where(column.is_(None)).values({column: value}))
        self._alter_nullable(op, f, nullable=False)

    def add_sqlite_column(self, op: Operation, f: FieldDef, column: sa.Column[Any]) -> None:
        fill_later = False
        if not column.nullable and column.server_default is None:
            if not (f.has_default and f.default is not None):
                # SQLite refuses ADD COLUMN NOT NULL without a default; the check made
                # sure the table is empty, so rebuilding it in its new shape is cheap.
                self.rebuild.setdefault(op.entity, {})
                return
            # A list or object default: add the column nullable, fill it, and let the
            # rebuild make it NOT NULL.
            column = sa.Column(column.name, column.type, nullable=True)
            fill_later = True
        spec = sa.schema.CreateColumn(column).compile(dialect=self.conn.dialect)
        ddl = f'ALTER TABLE "{op.entity}" ADD COLUMN {spec}'
        if f.type == "lookup":
            ddl += (
                f' REFERENCES "{f.get("target")}" (id) '
                f"ON DELETE {ON_DELETE[f.get('on_delete', 'set_null')]}"
            )
        self.conn.exec_driver_sql(ddl)
        if fill_later:
            self._fill_default(op, f)

    def do_add_relation(self, op: Operation) -> None:
        self.new_md.tables[link_table_name(op.entity, op.field)].create(self.conn)

    def do_add_field_index(self, op: Operation) -> None:
        if op.entity in self.rebuild and self.sqlite:
            return
        table = self.new_md.tables[op.entity]
        for index in field_indexes(self.new.entities[op.entity].fields[op.field], table):
            index.create(self.conn)

    def do_drop_field_index(self, op: Operation) -> None:
        table = self.old_md.tables[op.entity]
        f = FieldDef(op.entity, op.params["doc"])
        for index in table.indexes:
            if index.name in (
                constraint_name("ix", op.entity, f.name),
                constraint_name("uq", op.entity, f.name),
            ):
                index.drop(self.conn)

    def do_add_index(self, op: Operation) -> None:
        if op.entity in self.rebuild and self.sqlite:
            return  # the rebuild creates every index of the new shape
        table = self.new_md.tables[op.entity]
        name = constraint_name("ix", op.entity, op.params["index"]["name"])
        indexes = backend_indexes(table, self.conn.dialect.name)
        next(i for i in indexes if i.name == name).create(self.conn)

    def do_drop_index(self, op: Operation) -> None:
        table = self.old_md.tables[op.entity]
        name = constraint_name("ix", op.entity, op.params["index"]["name"])
        indexes = backend_indexes(table, self.conn.dialect.name)
        next(i for i in indexes if i.name == name).drop(self.conn)

    # -- changing columns ----------------------------------------------------------------

    def do_change_type(self, op: Operation) -> None:
        old, new = _field(op, "old"), _field(op)
        if self.sqlite:
            self.rebuild.setdefault(op.entity, {})[op.field] = op
            return
        rule = conversion(old, new)
        assert rule is not None  # the planner refuses changes without a rule
        column = self.new_md.tables[op.entity].c[new.name]
        self.ops.alter_column(
            op.entity,
            new.name,
            type_=column.type,
            schema=self.schema,
            postgresql_using=rule.using.format(col=f'"{new.name}"'),
        )

    def do_set_required(self, op: Operation) -> None:
        f = self.new.entities[op.entity].fields[op.field]
        table = self.new_md.tables[op.entity]
        if f.has_default:
            value = fieldtypes.get(f.type).coerce(f, f.default)
            for column in _columns(table, f):
                self.conn.execute(table.update().where(column.is_(None)).values({column: value}))
        self._alter_nullable(op, f, nullable=False)

    def do_archive_field(self, op: Operation) -> None:
        """Let an archived field's column take nulls: new records no longer fill it."""
        f = self.old_md.info["bundle_def"].entities[op.entity].fields[op.field]
        if f.required and fieldtypes.get(f.type).stored:
            self._alter_nullable(op, f, nullable=True)

    def do_change_default(self, op: Operation) -> None:
        if self.sqlite:
            self.rebuild.setdefault(op.entity, {})
            return
        column = self.new_md.tables[op.entity].c[op.field]
        self.ops.alter_column(
            op.entity,
            op.field,
            server_default=column.server_default.arg if column.server_default is not None else None,
            existing_type=column.type,
            schema=self.schema,
        )

    def do_drop_required(self, op: Operation) -> None:
        f = self.new.entities[op.entity].fields[op.field]
        self._alter_nullable(op, f, nullable=True)

    def _alter_nullable(self, op: Operation, f: FieldDef, nullable: bool) -> None:
        if self.sqlite:
            self.rebuild.setdefault(op.entity, {})
            return
        for name in fieldtypes.get(f.type).column_names(f):
            self.ops.alter_column(op.entity, name, nullable=nullable, schema=self.schema)

    def do_change_on_delete(self, op: Operation) -> None:
        if self.sqlite:
            self.rebuild.setdefault(op.entity, {})
            return
        f = _field(op)
        name = constraint_name("fk", op.entity, f.name)
        self.ops.drop_constraint(name, op.entity, type_="foreignkey", schema=self.schema)
        self.ops.create_foreign_key(
            name,
            op.entity,
            f.get("target"),
            [f.name],
            ["id"],
            ondelete=ON_DELETE[f.get("on_delete", "set_null")],
            source_schema=self.schema,
            referent_schema=self.schema,
        )

    # -- removing ------------------------------------------------------------------------

    def do_purge_field(self, op: Operation) -> None:
        f = _field(op)
        if f.type == "many_to_many":
            self.old_md.tables[link_table_name(op.entity, f.name)].drop(self.conn)
            return
        if not fieldtypes.get(f.type).stored:
            return
        if self.sqlite:
            self.rebuild.setdefault(op.entity, {})
            return
        for name in fieldtypes.get(f.type).column_names(f):
            self.ops.drop_column(op.entity, name, schema=self.schema)

    def do_purge_entity(self, op: Operation) -> None:
        entity = Bundle.from_doc(self.old_md.info["bundle"]).entities[op.entity]
        for f in entity.fields.values():
            if f.type == "many_to_many":
                self.old_md.tables[link_table_name(op.entity, f.name)].drop(self.conn)
        self.old_md.tables[op.entity].drop(self.conn)

    # -- SQLite table rebuild --------------------------------------------------------------

    def rebuild_sqlite_table(self, name: str, conversions: dict[str, Operation]) -> None:
        """Give a SQLite table its new shape by copy and rename (sqlite.org/lang_altertable)."""
        target = self.new_md.tables[name]
        # Read the values to convert before the copy: the new column's type affinity
        # would already turn some of them (" 12 " → 12) while copying.
        converted = {
            field_name: self._converted_values(name, field_name, op)
            for field_name, op in conversions.items()
        }
        current = {row[1] for row in self.conn.exec_driver_sql(f'PRAGMA table_info("{name}")')}
        # The copy lives beside the real tables so its foreign keys resolve; its
        # indexes are made after the rename, under their real names.
        temp = target.to_metadata(self.new_md, name=f"_rebuild_{name}")
        for index in list(temp.indexes):
            temp.indexes.discard(index)
        temp.create(self.conn)
        self.new_md.remove(temp)
        shared = [c.name for c in target.columns if c.name in current]
        columns = ", ".join(f'"{c}"' for c in shared)
        self.conn.exec_driver_sql(
            f'INSERT INTO "_rebuild_{name}" ({columns}) SELECT {columns} FROM "{name}"'
        )
        self.conn.exec_driver_sql(f'DROP TABLE "{name}"')
        self.conn.exec_driver_sql(f'ALTER TABLE "_rebuild_{name}" RENAME TO "{name}"')
        for field_name, values in converted.items():
            if values:
                update = (
                    target.update()
                    .where(target.c.id == sa.bindparam("row_id"))
                    .values({field_name: sa.bindparam("value", type_=target.c[field_name].type)})
                )
                self.conn.execute(update, values)
        for index in backend_indexes(target, "sqlite"):
            index.create(self.conn)

    def _converted_values(self, table: str, field_name: str, op: Operation) -> list[dict[str, Any]]:
        rule = conversion(_field(op, "old"), _field(op))
        assert rule is not None  # the planner refuses changes without a rule
        column = self.old_md.tables[table].c[field_name]
        rows = self.conn.execute(
            sa.select(self.old_md.tables[table].c.id, column).where(column.is_not(None))
        )
        return [{"row_id": row_id, "value": rule.convert(value)} for row_id, value in rows]


def apply_plan(
    connection: Connection,
    schema: str | None,
    old: Bundle,
    plan: Plan,
    prepared: PreparedPlan | None = None,
) -> None:
    """Apply ``plan`` to the tenant's tables inside the caller's transaction.

    Search indexes follow the new shape in the same transaction. ``prepared`` is
    ``plan`` with its tables built already (only for a plan from the empty bundle).
    """
    if prepared is not None and (prepared.plan is not plan or old.entities):
        raise ValueError("a prepared plan applies to an empty namespace, as itself")
    _Applier(connection, schema, old, plan, prepared).run()


def foreign_key_violations(connection: Connection) -> list[tuple[Any, ...]]:
    """Return SQLite's foreign-key violations (empty on PostgreSQL, which enforces them)."""
    if connection.dialect.name != "sqlite":
        return []
    return [tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")]


def destructive_operations(plan: Plan) -> Iterable[Operation]:
    """Yield the operations of a plan that drop data."""
    return (op for op in plan.operations if op.destructive)
