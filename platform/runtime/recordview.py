"""How a record is read: the select list, and a row turned into API JSON.

Formula fields have no column: their expression is compiled into the select
list, so they can be filtered and sorted like stored fields. Values leave as
JSON that round-trips: ids as strings, dates as ISO 8601, datetimes in UTC
with ``Z``, decimals as strings (a JSON number would lose exactness).
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression import EvalContext, compile_sql, parse, table_resolver
from metacrm.metadata.identifiers import SYSTEM_COLUMN_ORDER
from metacrm.metadata.model import FieldDef
from metacrm.runtime.model import EntityModel, TenantModel

SYSTEM_FIELDS = SYSTEM_COLUMN_ORDER


def json_value(value: Any) -> Any:
    """Return a stored value as JSON."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return format(value, "f")  # never exponent form such as 1.00E-8
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def column_resolver(model: TenantModel, entity: EntityModel, ctx: EvalContext) -> Any:
    """Return the expression resolver of an entity: columns, one lookup hop, formulas."""
    tables = {name: e.table for name, e in model.entities.items()}
    base = table_resolver(tables, entity.scope)

    def resolve(path: tuple[str, ...]) -> sa.ColumnElement[Any]:
        if len(path) == 1:
            f = entity.field(path[0])
            if f is not None and f.type == "formula":
                return formula_expression(model, entity, f, ctx)
        return base(path)

    return resolve


def formula_expression(
    model: TenantModel, entity: EntityModel, f: FieldDef, ctx: EvalContext
) -> sa.ColumnElement[Any]:
    """Compile a formula field to the SQL expression that computes it."""
    node = parse(f.get("expression"))
    return compile_sql(node, entity.scope, column_resolver(model, entity, ctx), ctx)


def select_columns(
    model: TenantModel,
    entity: EntityModel,
    ctx: EvalContext,
    fields: Sequence[str] | None = None,
) -> list[sa.ColumnElement[Any]]:
    """Return the select list of an entity: system columns, stored fields, formulas."""
    table = entity.table
    chosen = [table.c[name] for name in SYSTEM_FIELDS]
    for f in entity.entity.active_fields():
        if fields is not None and f.name not in fields:
            continue
        ft = fieldtypes.get(f.type)
        if f.type == "formula":
            chosen.append(formula_expression(model, entity, f, ctx).label(f.name))
        elif ft.stored:
            chosen.extend(table.c[name] for name in ft.column_names(f))
    return chosen


def to_json(entity: EntityModel, row: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a selected row into the record's JSON (without many-to-many values)."""
    record: dict[str, Any] = {name: json_value(row[name]) for name in SYSTEM_FIELDS}
    for f in entity.entity.active_fields():
        if f.type == "related_to":
            if f"{f.name}_entity" in row:
                kind, target = row[f"{f.name}_entity"], row[f"{f.name}_id"]
                record[f.name] = None if target is None else {"entity": kind, "id": str(target)}
        elif f.type == "encrypted_text":
            if f.name in row:
                record[f.name] = None if row[f.name] is None else "********"
        elif f.name in row:
            record[f.name] = json_value(row[f.name])
    return record


def attach_relations(
    connection: Connection, entity: EntityModel, records: Iterable[dict[str, Any]]
) -> None:
    """Add many-to-many values (lists of target ids) to records, one query per relation."""
    records = list(records)
    if not records or not entity.links:
        return
    ids = [uuid.UUID(r["id"]) for r in records]
    for name, link in entity.links.items():
        found: dict[str, list[str]] = {r["id"]: [] for r in records}
        query = (
            sa.select(link.c.source_id, link.c.target_id)
            .where(link.c.source_id.in_(ids))
            .order_by(link.c.source_id, link.c.created_at, link.c.target_id)
        )
        for source, target in connection.execute(query):
            found[str(source)].append(str(target))
        for record in records:
            record[name] = found[record["id"]]
