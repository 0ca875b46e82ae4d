"""How a record is read: the select list, and a row turned into API JSON.

Formula fields have no column: their expression is compiled into the select
list, so they can be filtered and sorted like stored fields. Values leave as
JSON that round-trips: ids as strings, dates as ISO 8601, datetimes in UTC
with ``Z``, decimals as strings (a JSON number would lose exactness).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression import EvalContext, compile_sql, parse, table_resolver
from metacrm.metadata.identifiers import SYSTEM_COLUMN_ORDER
from metacrm.metadata.model import EntityDef, FieldDef
from metacrm.runtime.model import EntityModel, TenantModel

SYSTEM_FIELDS = SYSTEM_COLUMN_ORDER
_PLAIN, _RELATED, _MASKED, _DECIMAL = 0, 1, 2, 3
#: How rows of one select list become JSON, per entity definition and column list.
_VIEW_PLANS: weakref.WeakKeyDictionary[EntityDef, dict[tuple[str, ...], tuple]] = (
    weakref.WeakKeyDictionary()
)
_VIEW_PLANS_LOCK = threading.Lock()
MAX_VIEW_PLANS = 256


def _same(value: Any) -> Any:
    return value


def _datetime(value: dt.datetime) -> str:
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    return value.isoformat().replace("+00:00", "Z")


def _decimal(value: decimal.Decimal) -> str:
    return format(value, "f")  # never exponent form such as 1.00E-8


#: Converters by exact type: one dictionary lookup per value instead of a chain of
#: isinstance() checks (a 50-row page has ~1,000 values; this is the per-row cost).
_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    str: _same,
    int: _same,
    bool: _same,
    float: _same,
    uuid.UUID: str,
    dt.datetime: _datetime,
    dt.date: dt.date.isoformat,
    decimal.Decimal: _decimal,
}


_FLOAT_DIGITS = 15
_FLOAT_CONTEXT = decimal.Context(prec=_FLOAT_DIGITS)


def _decimal_formula(scale: int | None) -> Callable[[Any], str | None]:
    """Return how a decimal formula's value is shown: the same text on every database.

    PostgreSQL computes in ``numeric`` (``25.000``), SQLite in floating point
    (``25.0``); both become a Decimal of the value's shortest exact text, rounded
    half away from zero to the formula's ``scale`` when it has one (``25.00``).
    """
    quantum = None if scale is None else decimal.Decimal(1).scaleb(-scale)

    def show(value: Any) -> str | None:
        if value is None:
            return None
        try:
            if isinstance(value, decimal.Decimal):
                number = value
            elif isinstance(value, float):
                number = decimal.Decimal(repr(value))
                if len(number.as_tuple().digits) > _FLOAT_DIGITS:
                    # Binary noise (0.30000000000000004): a double holds 15 exact digits.
                    number = _FLOAT_CONTEXT.plus(number).normalize()
            else:
                number = decimal.Decimal(str(value))
        except decimal.InvalidOperation:
            return str(value)
        if not number.is_finite():
            return None
        if quantum is not None:
            with contextlib.suppress(decimal.InvalidOperation):  # beyond 28 digits: as is
                number = number.quantize(quantum, decimal.ROUND_HALF_UP)
        return format(number, "f")

    return show


def json_value(value: Any) -> Any:
    """Return a stored value as JSON."""
    if value is None:
        return None
    convert = _CONVERTERS.get(type(value))
    if convert is not None:
        return convert(value)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return _datetime(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
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
    """Compile a formula field to the SQL expression that computes it.

    The expression was parsed once when the published version was compiled
    (``EntityModel.formulas``); only the SQL is built here, because it depends on
    the request (``today()``, ``me()``).
    """
    node = entity.formulas.get(f.name)
    if node is None:
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


def _view_plan(entity: EntityModel, keys: tuple[str, ...]) -> tuple:
    """Return, for rows with these columns, (JSON name, column position(s), kind) in order."""
    with _VIEW_PLANS_LOCK:
        found = _VIEW_PLANS.get(entity.entity, {}).get(keys)
    if found is not None:
        return found
    position = {name: i for i, name in enumerate(keys)}
    plan: list[tuple[str, Any, int]] = [
        (name, position[name], _PLAIN) for name in SYSTEM_FIELDS if name in position
    ]
    for f in entity.entity.active_fields():
        if f.type == "related_to":
            if f"{f.name}_entity" in position:
                pair = (position[f"{f.name}_entity"], position[f"{f.name}_id"])
                plan.append((f.name, pair, _RELATED))
        elif f.type == "formula" and f.get("result_type") == "decimal" and f.name in position:
            plan.append((f.name, (position[f.name], _decimal_formula(f.get("scale"))), _DECIMAL))
        elif f.name in position:
            plan.append(
                (f.name, position[f.name], _MASKED if f.type == "encrypted_text" else _PLAIN)
            )
    found = tuple(plan)
    with _VIEW_PLANS_LOCK:
        plans = _VIEW_PLANS.setdefault(entity.entity, {})
        if len(plans) >= MAX_VIEW_PLANS:
            # ``fields=`` can name many column sets; keep memory bounded, not every set.
            plans.clear()
        plans[keys] = found
    return found


def rows_to_json(
    entity: EntityModel, keys: Sequence[str], rows: Iterable[Sequence[Any]]
) -> list[dict[str, Any]]:
    """Turn selected rows (tuples in ``keys`` order) into records' JSON.

    The column-to-field plan is worked out once per entity and select list, and
    each value is converted by a lookup on its exact type: a list page spends
    its Python time here, so nothing per row asks the metadata anything.
    """
    plan = _view_plan(entity, tuple(keys))
    converters = _CONVERTERS
    records = []
    for row in rows:
        record: dict[str, Any] = {}
        for name, at, kind in plan:
            if kind == _PLAIN:
                value = row[at]
                if value is not None:
                    convert = converters.get(type(value))
                    value = convert(value) if convert is not None else json_value(value)
                record[name] = value
            elif kind == _DECIMAL:
                record[name] = at[1](row[at[0]])
            elif kind == _RELATED:
                target = row[at[1]]
                record[name] = None if target is None else {"entity": row[at[0]], "id": str(target)}
            else:
                record[name] = None if row[at] is None else "********"
        records.append(record)
    return records


def to_json(entity: EntityModel, row: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a selected row (a mapping) into the record's JSON (without many-to-many values)."""
    keys = tuple(row.keys())
    return rows_to_json(entity, keys, [tuple(row[k] for k in keys)])[0]


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
