"""How a record is read: the select list, and a row turned into API JSON.

Formula fields have no column: their expression is compiled into the select
list, so they can be filtered and sorted like stored fields. Values leave as
JSON that round-trips: ids as strings, dates as ISO 8601, datetimes in UTC
with ``Z``, decimals as strings (a JSON number would lose exactness).

Lists and reads by id select their stored columns *raw* (``raw=`` the
connection's dialect): ids, timestamps, decimals and dates leave the driver
untouched, without SQLAlchemy's result processors, and one converter per
column and backend turns the driver's value straight into the same JSON text.
A value went through two conversions before (driver value to Python object,
object to JSON); now it goes through one. See
docs/decisions/0011-raw-rows-on-the-read-path.md.
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
from sqlalchemy.engine import Connection, Dialect

from metacrm.metadata import fieldtypes
from metacrm.metadata.coltypes import ExactDecimal, UTCDateTime
from metacrm.metadata.expression import EvalContext, compile_sql, parse, table_resolver
from metacrm.metadata.identifiers import SYSTEM_COLUMN_ORDER
from metacrm.metadata.model import EntityDef, FieldDef
from metacrm.runtime.contextfree import ContextFreeCache
from metacrm.runtime.model import EntityModel, TenantModel

SYSTEM_FIELDS = SYSTEM_COLUMN_ORDER
_PLAIN, _RELATED, _MASKED, _DECIMAL, _SAME, _CONVERT = 0, 1, 2, 3, 4, 5
#: How rows of one select list become JSON, per entity definition and column list.
_VIEW_PLANS: weakref.WeakKeyDictionary[EntityDef, dict[tuple, tuple]] = weakref.WeakKeyDictionary()
_VIEW_PLANS_LOCK = threading.Lock()
MAX_VIEW_PLANS = 256


def _same(value: Any) -> Any:
    return value


def _datetime(value: dt.datetime) -> str:
    text = value.isoformat()
    if text.endswith("+00:00"):
        # Already UTC (the driver's own UTC zone object, too): no conversion needed.
        return text[:-6] + "Z"
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


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


def json_values(values: list[Any]) -> list[Any]:
    """Return stored values as JSON, ``json_value`` of each, for a column of them.

    A column of one type (checked in C) maps that type's converter over it, with
    no look-up per value (an import's audit columns).
    """
    kinds = set(map(type, values))
    convert = _CONVERTERS.get(kinds.pop()) if len(kinds) == 1 else None
    return list(map(convert or json_value, values))


#: What a raw column is selected as: a type without result processing, so the
#: driver's value arrives as it is.
_UNPROCESSED = sa.types.NullType()
#: Column types whose values SQLAlchemy hands over as JSON already (text, whole
#: numbers, booleans): selected as usual, copied as they are.
_JSON_NATIVE: frozenset[type] = frozenset(
    {sa.String, sa.Text, sa.Integer, sa.BigInteger, sa.SmallInteger, sa.Boolean}
)
#: ``YYYY-MM-DD HH:MM:SS.ffffff``: how SQLAlchemy stores a datetime in SQLite.
_SQLITE_DATETIME_LENGTH = 26


def _typed(column_type: sa.types.TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """Return what SQLAlchemy would make of a SQLite value (whose processors need no type code)."""
    process = column_type.dialect_impl(dialect).result_processor(dialect, None)
    return process if process is not None else _same


def _sqlite_uuid(value: str) -> str:
    if len(value) == 32:  # stored as uuid.hex
        v = value.lower()
        return f"{v[:8]}-{v[8:12]}-{v[12:16]}-{v[16:20]}-{v[20:]}"
    return str(uuid.UUID(value))


def _sqlite_datetime(slow: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def show(value: Any) -> Any:
        if (
            type(value) is str
            and len(value) == _SQLITE_DATETIME_LENGTH
            and value[10] == " "
            and value[19] == "."
        ):
            # Naive UTC text: the ISO form is the same characters, less a zero fraction.
            if value.endswith(".000000"):
                return f"{value[:10]}T{value[11:19]}Z"
            return f"{value[:10]}T{value[11:]}Z"
        return json_value(slow(value))

    return show


def _sqlite_date(slow: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def show(value: Any) -> Any:
        if type(value) is str and len(value) == 10 and value[4] == "-" and value[7] == "-":
            return value  # stored as YYYY-MM-DD, which is the ISO form
        return json_value(slow(value))

    return show


def _exact_decimal(column_type: ExactDecimal, dialect: Dialect) -> Callable[[Any], str]:
    process = column_type.process_result_value
    quantum = decimal.Decimal(1).scaleb(-column_type.scale)
    even = decimal.ROUND_HALF_EVEN

    def show(value: Any) -> str:
        # ExactDecimal.process_result_value for the drivers' own types, without its checks.
        if type(value) is float:  # SQLite's REAL
            return format(decimal.Decimal(repr(value)).quantize(quantum, even), "f")
        if type(value) is decimal.Decimal:  # PostgreSQL's NUMERIC
            return format(value.quantize(quantum, even), "f")
        return _decimal(process(value, dialect))

    return show


def raw_converter(
    column_type: sa.types.TypeEngine[Any], dialect: Dialect
) -> Callable[[Any], Any] | None:
    """Return how a raw driver value of a column becomes JSON; None when it is read typed.

    PostgreSQL's driver returns ``uuid.UUID``, aware datetimes, ``Decimal`` and
    ``date``; SQLite returns what SQLAlchemy stored: ids as 32 hex digits,
    datetimes as naive UTC text, decimals as REAL (quantized to the field's
    scale as ``ExactDecimal`` does), dates as ISO text. Anything that is not in
    the stored shape goes the old way (SQLAlchemy's processor, then
    ``json_value``), so the JSON is the same text either way.
    """
    sqlite = dialect.name == "sqlite"
    if isinstance(column_type, ExactDecimal):
        return _exact_decimal(column_type, dialect)
    if isinstance(column_type, UTCDateTime):
        return _sqlite_datetime(_typed(column_type, dialect)) if sqlite else _datetime
    if type(column_type) is sa.Uuid:
        return _sqlite_uuid if sqlite else str
    if type(column_type) is sa.Date:
        return _sqlite_date(_typed(column_type, dialect)) if sqlite else dt.date.isoformat
    return None


def typed_reader(entity: EntityModel, name: str, dialect: Dialect) -> Callable[[Any], Any]:
    """Return how a raw value of the select list's ``name`` becomes what SQLAlchemy returns.

    Cursors keep typed sort key values; a raw list converts its last row's only.
    """
    column = entity.table.c.get(name)
    if column is None or raw_converter(column.type, dialect) is None:
        return _same
    if isinstance(column.type, ExactDecimal):
        # The impl's processor would need the driver's type code on PostgreSQL; the
        # decorator's own step takes both drivers' values (Decimal, float).
        decimal_type = column.type
        return lambda value: decimal_type.process_result_value(value, dialect)
    process = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return process if process is not None else _same


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
    *,
    raw: Dialect | None = None,
) -> list[sa.ColumnElement[Any]]:
    """Return the select list of an entity: system columns, stored fields, formulas.

    With ``raw`` (the connection's dialect) the columns ``raw_converter`` knows
    are selected without result processing; give the same dialect to
    ``rows_to_json``.
    """
    table = entity.table

    def stored(name: str) -> sa.ColumnElement[Any]:
        column = table.c[name]
        if raw is not None and raw_converter(column.type, raw) is not None:
            # The same column of the same table, typed so that no result processor runs:
            # the SQL reads exactly as before (no cast, no alias).
            return sa.column(name, _UNPROCESSED, _selectable=table)
        return column

    chosen = [stored(name) for name in SYSTEM_FIELDS]
    for f in entity.entity.active_fields():
        if fields is not None and f.name not in fields:
            continue
        ft = fieldtypes.get(f.type)
        if f.type == "formula":
            chosen.append(formula_expression(model, entity, f, ctx).label(f.name))
        elif ft.stored:
            chosen.extend(stored(name) for name in ft.column_names(f))
    return chosen


#: Select lists built without the request's context (no formula reads it).
_SELECT_LISTS = ContextFreeCache()


def cached_select_columns(
    model: TenantModel,
    entity: EntityModel,
    ctx: EvalContext,
    fields: tuple[str, ...] | None,
    raw: Dialect | None,
) -> list[sa.ColumnElement[Any]]:
    """Return ``select_columns``, built once per entity model unless a formula reads ``ctx``."""
    key = (fields, None if raw is None else (raw.name, raw.driver))

    def build(watched: EvalContext) -> list[sa.ColumnElement[Any]]:
        return select_columns(model, entity, watched, fields, raw=raw)

    return list(_SELECT_LISTS.get(entity, key, build, ctx))


def _view_plan(entity: EntityModel, keys: tuple[str, ...], raw: Dialect | None) -> tuple:
    """Return, for rows with these columns, (JSON name, column position(s), kind) in order.

    Rows are typed (SQLAlchemy's objects) without ``raw``; with it, the columns
    ``select_columns(raw=...)`` selected raw hold driver values, and each gets
    its converter here, once.
    """
    cache_key = (keys, None if raw is None else (raw.name, raw.driver))
    with _VIEW_PLANS_LOCK:
        found = _VIEW_PLANS.get(entity.entity, {}).get(cache_key)
    if found is not None:
        return found
    position = {name: i for i, name in enumerate(keys)}
    table = entity.table

    def stored(name: str) -> tuple[Any, int]:
        """(position or (position, converter), kind) of a stored column."""
        column = table.c.get(name)
        if raw is not None and column is not None:
            convert = raw_converter(column.type, raw)
            if convert is not None:
                return (position[name], convert), _CONVERT
            if type(column.type) in _JSON_NATIVE:
                return position[name], _SAME
        return position[name], _PLAIN

    plan: list[tuple[str, Any, int]] = [
        (name, *stored(name)) for name in SYSTEM_FIELDS if name in position
    ]
    for f in entity.entity.active_fields():
        if f.type == "related_to":
            if f"{f.name}_entity" in position:
                target = table.c[f"{f.name}_id"]
                convert = None if raw is None else raw_converter(target.type, raw)
                pair = (position[f"{f.name}_entity"], position[f"{f.name}_id"], convert or str)
                plan.append((f.name, pair, _RELATED))
        elif f.type == "formula" and f.get("result_type") == "decimal" and f.name in position:
            plan.append((f.name, (position[f.name], _decimal_formula(f.get("scale"))), _DECIMAL))
        elif f.type == "encrypted_text" and f.name in position:
            plan.append((f.name, position[f.name], _MASKED))
        elif f.type == "formula" and f.name in position:
            plan.append((f.name, position[f.name], _PLAIN))
        elif f.name in position:
            plan.append((f.name, *stored(f.name)))
    found = tuple(plan)
    with _VIEW_PLANS_LOCK:
        plans = _VIEW_PLANS.setdefault(entity.entity, {})
        if len(plans) >= MAX_VIEW_PLANS:
            # ``fields=`` can name many column sets; keep memory bounded, not every set.
            plans.clear()
        plans[cache_key] = found
    return found


def rows_to_json(
    entity: EntityModel,
    keys: Sequence[str],
    rows: Iterable[Sequence[Any]],
    raw: Dialect | None = None,
) -> list[dict[str, Any]]:
    """Turn selected rows (tuples in ``keys`` order) into records' JSON.

    The column-to-field plan is worked out once per entity and select list, and
    each value is converted by its column's converter (raw rows: ``raw`` is the
    dialect the select list was built for) or by a lookup on its exact type: a
    list page spends its Python time here, so nothing per row asks the metadata
    anything.
    """
    plan = _view_plan(entity, tuple(keys), raw)
    converters = _CONVERTERS
    records = []
    for row in rows:
        record: dict[str, Any] = {}
        for name, at, kind in plan:
            if kind == _SAME:
                record[name] = row[at]
            elif kind == _CONVERT:
                value = row[at[0]]
                record[name] = None if value is None else at[1](value)
            elif kind == _PLAIN:
                value = row[at]
                if value is not None:
                    convert = converters.get(type(value))
                    value = convert(value) if convert is not None else json_value(value)
                record[name] = value
            elif kind == _DECIMAL:
                record[name] = at[1](row[at[0]])
            elif kind == _RELATED:
                target = row[at[1]]
                record[name] = (
                    None if target is None else {"entity": row[at[0]], "id": at[2](target)}
                )
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
