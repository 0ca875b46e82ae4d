"""Record lists: filter, sort, keyset pages, quick search, include, counts, related records.

Everything a list asks for becomes one SELECT: the filter is compiled from the
expression language into the WHERE clause, the row-level ``scope`` is ANDed
in, the sort is an ORDER BY that always ends in ``id`` so the order is total,
and the next page starts strictly after the last row's sort key (keyset
pagination; never OFFSET). For ``status = "new"`` sorted by ``-created_at`` the
SQL is what a person would write::

    SELECT deal.id, … FROM deal
    WHERE deal.deleted_at IS NULL AND deal.status = ?
    ORDER BY deal.created_at DESC, deal.id DESC LIMIT 51

Text sorts by code point everywhere (``COLLATE "C"`` on PostgreSQL), the rule
the expression language compares text by, and NULLs sort last ascending and
first descending on both backends (PostgreSQL's own default, which SQLite is
told explicitly), so a cursor's "after this row" means the same as ORDER BY.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import difflib
import functools
import json
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement, ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression import (
    EvalContext,
    ExpressionError,
    Node,
    Scope,
    ValueType,
    check,
    compile_sql,
    unparse,
)
from metacrm.metadata.expression.construct import CodepointOrder
from metacrm.metadata.expression.nodes import children
from metacrm.runtime import cursor as cursors
from metacrm.runtime import direct, search
from metacrm.runtime.contextfree import ContextFreeCache
from metacrm.runtime.model import EntityModel, TenantModel, parsed
from metacrm.runtime.pipeline import pipelined
from metacrm.runtime.recordview import (
    SYSTEM_FIELDS,
    attach_relations,
    cached_select_columns,
    column_resolver,
    formula_expression,
    rows_to_json,
    typed_reader,
)

DEFAULT_SORT = "-created_at"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_SORT_KEYS = 8
MAX_SORT_LENGTH = 1000
MAX_SEARCH_LENGTH = 200
#: System columns a list can be sorted by, with their expression types.
SYSTEM_SORTS = {
    "id": ValueType.UUID,
    "owner_id": ValueType.UUID,
    "created_at": ValueType.DATETIME,
    "updated_at": ValueType.DATETIME,
    "deleted_at": ValueType.DATETIME,
}
INCLUDED = "_included"

#: The Python type a sort key of each expression type reads back as (checked in cursors).
_VALUE_KINDS: dict[ValueType, type] = {
    ValueType.TEXT: str,
    ValueType.INTEGER: int,
    ValueType.DECIMAL: decimal.Decimal,
    ValueType.BOOLEAN: bool,
    ValueType.DATE: dt.date,
    ValueType.DATETIME: dt.datetime,
    ValueType.UUID: uuid.UUID,
}
#: What SQLite says when a statement is too deeply nested for its parser or code generator.
_SQLITE_TOO_COMPLEX = ("parser stack overflow", "too many", "too large", "too deep")
_PG_TOO_COMPLEX = "stack depth limit exceeded"
_PG_QUERY_CANCELED = "57014"


#: The caller's read condition on another entity (``false()`` when it may not read it).
EmbedScope = Callable[[EntityModel], ColumnElement[bool] | None]


class QueryError(ValueError):
    """A list request that cannot be answered as asked: the API's 400 problem.

    ``code`` is stable (``invalid_filter``, ``invalid_sort``, ``invalid_fields``,
    ``invalid_include``, ``invalid_limit``, ``invalid_cursor``, ``invalid_search``,
    ``not_related``, ``count_timeout``); ``pointer`` names the request parameter
    (``/filter``; empty when no one parameter is at fault); ``line`` and
    ``column`` locate an error inside an expression.
    """

    def __init__(
        self,
        code: str,
        message: str,
        pointer: str = "",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.pointer = pointer
        self.line = line
        self.column = column

    def to_dict(self) -> dict[str, Any]:
        """Return the error as the members of a problem document."""
        found: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.pointer:
            found["pointer"] = self.pointer
        if self.line is not None:
            found["line"] = self.line
            found["column"] = self.column
        return found


@dataclass(frozen=True)
class ListRequest:
    """What a client asks of a list; every part is checked against the entity."""

    filter: str | None = None
    sort: str | None = None
    fields: tuple[str, ...] | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    q: str | None = None
    include: tuple[str, ...] = ()
    deleted: bool = False


@dataclass(frozen=True)
class Page:
    """One page of records and the cursor of the next page (None on the last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


# -- public API ---------------------------------------------------------------------------


def list_records(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    request: ListRequest,
    ctx: EvalContext,
    secret: bytes,
    scope: ColumnElement[bool] | None = None,
    *,
    embed_scope: EmbedScope | None = None,
) -> Page:
    """Return one page of an entity's records as JSON; QueryError when the request is wrong.

    ``scope`` is the caller's row-level condition on the entity (in the WHERE
    clause); ``embed_scope`` gives it for the targets of ``include=``, so an
    embedded record the caller may not read is ``null`` like a missing one.
    """
    return _list(connection, model, entity, request, ctx, secret, scope, None, None, embed_scope)


def count_records(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    filter: str | None,
    ctx: EvalContext,
    *,
    exact: bool = False,
    threshold: int = 1000,
    scope: ColumnElement[bool] | None = None,
    timeout_ms: int = 2000,
    q: str | None = None,
    deleted: bool = False,
) -> tuple[int, bool]:
    """Count matching records: (value, is_exact).

    Up to ``threshold`` the count is exact and costs at most ``threshold + 1``
    index entries; beyond it the value is PostgreSQL's plan estimate (on SQLite
    ``threshold + 1``) with ``is_exact`` False. ``exact=True`` counts everything,
    stopped after ``timeout_ms`` with QueryError ``count_timeout``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError("threshold must be a whole number >= 0")
    where = _Where.build(connection, model, entity, filter, q, deleted, ctx, scope)
    table = entity.table
    if exact:
        query = sa.select(_COUNT).select_from(table).where(*where.conditions)
        with _deadline(connection, timeout_ms):
            return int(_execute(connection, query, where.node).scalar_one()), True
    counted, explain = _count_statements(table, threshold, tuple(where.conditions))
    if connection.dialect.name != "postgresql":
        found = int(_execute(connection, counted, where.node).scalar_one())
        return (found, True) if found <= threshold else (threshold + 1, False)
    hint = (entity, where.digest, threshold)
    if not _CAPPED.get(hint):
        found = int(_execute(connection, counted, where.node).scalar_one())
        if found <= threshold:
            return found, True
        _CAPPED.put(hint)
        return _estimate(connection.execute(explain).scalar_one(), threshold), False
    # This count reached the cap last time: ask for the estimate in the same round trip.
    try:
        with pipelined(connection) as pipe:
            # Shared conditions make shared statements (``_count_statements``).
            count = pipe.execute(counted, reused=where.shared)
            explained = pipe.execute(explain, reused=where.shared)
    except DBAPIError as exc:
        refused = _query_error(connection, exc, where.node)
        if refused is None:
            raise
        raise refused from None
    found = int(count.rows()[0][0])
    if found <= threshold:
        _CAPPED.drop(hint)
        return found, True
    return _estimate(explained.rows()[0][0], threshold), False


#: ``count(*)`` and the ``1`` a capped count selects, built once.
_COUNT = sa.func.count()
_ONE = sa.literal_column("1")


@functools.lru_cache(maxsize=256)
def _count_statements(
    table: sa.Table, threshold: int, conditions: tuple[ColumnElement[bool], ...]
) -> tuple[sa.Select[Any], _Explain]:
    """Return the capped count and the EXPLAIN behind its estimate, for a WHERE clause.

    Kept per condition objects: a filter's condition is built once per published
    version (and so are the recycle bin's), so a repeated count reuses both
    statements and SQLAlchemy their cache keys, which it otherwise computes on
    every call by walking the statement. Conditions built per request (a search,
    a row scope) make new entries that the least recent ones give way to.
    """
    capped = (
        sa.select(_ONE)
        .select_from(table)
        .where(*conditions)
        .suffix_with(f"LIMIT {threshold + 1}")
        .subquery("capped")
    )
    plain: sa.Select[Any] = sa.select(_ONE).select_from(table).where(*conditions)
    return sa.select(_COUNT).select_from(capped), _Explain(plain)


def _estimate(plan: Any, threshold: int) -> int:
    """Return the row estimate of an ``EXPLAIN (FORMAT JSON)`` answer, at least past the cap."""
    if isinstance(plan, str | bytes):
        plan = json.loads(plan)
    return max(int(plan[0]["Plan"]["Plan Rows"]), threshold + 1)


class _Hints:
    """Counts that reached their cap lately, per entity model: a bounded set of keys."""

    SIZE = 512

    def __init__(self) -> None:
        self._keys: dict[Any, None] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> bool:
        return key in self._keys

    def put(self, key: Any) -> None:
        with self._lock:
            self._keys[key] = None
            while len(self._keys) > self.SIZE:
                del self._keys[next(iter(self._keys))]

    def drop(self, key: Any) -> None:
        with self._lock:
            self._keys.pop(key, None)


#: Which counts to send with their estimate: past the cap, a count needs PostgreSQL's plan
#: estimate too, and asking for both at once saves a round trip; below it, the EXPLAIN
#: would only cost the server's planning. Keyed by entity model, filter digest and cap.
_CAPPED = _Hints()


def related_records(
    connection: Connection,
    model: TenantModel,
    target_entity: EntityModel,
    record_id: uuid.UUID,
    source: EntityModel,
    request: ListRequest,
    ctx: EvalContext,
    secret: bytes,
    scope: ColumnElement[bool] | None = None,
    *,
    via: str | None = None,
    embed_scope: EmbedScope | None = None,
) -> Page:
    """Return a page of ``source`` records that point at one record of ``target_entity``.

    A record points at it through a lookup, a related-to field or a
    many-to-many field of its own, or through a many-to-many field of the
    target's; ``via`` names the one field to follow when there are several
    (``deal.customer`` or ``deal.primary_contact``…). QueryError ``not_related``
    when no field links the two entities.
    """
    if via is not None and not isinstance(via, str):
        raise QueryError("not_related", "via must be a field name", "/via")
    table = source.table
    points: list[ColumnElement[bool]] = []
    for f in source.entity.active_fields():
        if via is not None and f.name != via:
            continue
        if f.type == "lookup" and f.get("target") == target_entity.name:
            points.append(table.c[f.name] == record_id)
        elif f.type == "related_to" and target_entity.name in f.get("targets", []):
            points.append(
                sa.and_(
                    table.c[f"{f.name}_entity"] == target_entity.name,
                    table.c[f"{f.name}_id"] == record_id,
                )
            )
        elif f.type == "many_to_many" and f.get("target") == target_entity.name:
            link = source.links[f.name]
            points.append(
                table.c.id.in_(sa.select(link.c.source_id).where(link.c.target_id == record_id))
            )
    for f in target_entity.entity.active_fields():
        # The other side of a many-to-many field the target entity holds.
        if via is not None and f.name != via:
            continue
        if f.type == "many_to_many" and f.get("target") == source.name:
            link = target_entity.links[f.name]
            points.append(
                table.c.id.in_(sa.select(link.c.target_id).where(link.c.source_id == record_id))
            )
    if not points:
        if via is not None:
            raise QueryError(
                "not_related",
                f"'{via}' is not a field of '{source.name}' that points to '{target_entity.name}'",
                "/via",
            )
        raise QueryError(
            "not_related", f"no field of '{source.name}' points to '{target_entity.name}'"
        )
    relation = points[0] if len(points) == 1 else sa.or_(*points)
    key = f"related:{target_entity.name}:{record_id}:{via or ''}"
    return _list(connection, model, source, request, ctx, secret, scope, relation, key, embed_scope)


# -- the WHERE clause ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """The conditions of a list, and what a cursor must agree on to continue it."""

    conditions: list[ColumnElement[bool]]
    node: Node | None
    digest: str
    #: Every condition is shared by all requests of the published version (see ``direct``).
    shared: bool = False

    @classmethod
    def build(
        cls,
        connection: Connection,
        model: TenantModel,
        entity: EntityModel,
        filter_text: str | None,
        q: str | None,
        deleted: bool,
        ctx: EvalContext,
        scope: ColumnElement[bool] | None,
        extra: ColumnElement[bool] | None = None,
        extra_key: str | None = None,
    ) -> _Where:
        conditions: list[ColumnElement[bool]] = [_bin_condition(entity, deleted, ctx)]
        node, canonical, shared = None, None, True
        if filter_text is not None:
            if not isinstance(filter_text, str):
                raise QueryError("invalid_filter", "the filter must be text", "/filter")
            if filter_text.strip():
                (node, compiled, canonical), shared = _compile_filter(
                    model, entity, filter_text, ctx
                )
                conditions.append(compiled)
        text = _search_text(q)
        if text is not None:
            found = search.search_condition(connection, entity, text)
            if found is None:
                raise QueryError(
                    "invalid_search", f"'{entity.name}' has no search fields to search in", "/q"
                )
            conditions.append(found)
        if extra is not None:
            conditions.append(extra)
        if scope is not None:
            conditions.append(scope)
        shared = shared and text is None and extra is None and scope is None
        return cls(conditions, node, cursors.digest(canonical, text, deleted, extra_key), shared)


#: "In the recycle bin" and "live", per entity model: the first condition of every list.
_BIN_CONDITIONS = ContextFreeCache()


def _bin_condition(entity: EntityModel, deleted: bool, ctx: EvalContext) -> ColumnElement[bool]:
    """Return ``deleted_at IS NOT NULL`` (the recycle bin) or ``IS NULL``, built once."""

    def build(_: EvalContext) -> ColumnElement[bool]:
        column = entity.table.c.deleted_at
        return column.is_not(None) if deleted else column.is_(None)

    return _BIN_CONDITIONS.get(entity, deleted, build, ctx)


_FILTER_SCOPES: weakref.WeakKeyDictionary[EntityModel, Scope] = weakref.WeakKeyDictionary()
_FILTER_SCOPES_LOCK = threading.Lock()


def _filter_scope(model: TenantModel, entity: EntityModel) -> Scope:
    """Return the entity's scope with what SQL cannot read yet marked as not filterable.

    A related-to field has two columns and no single value; a formula behind a
    lookup has no column for the lookup's subquery to read.
    """
    with _FILTER_SCOPES_LOCK:
        found = _FILTER_SCOPES.get(entity)
    if found is not None:
        return found

    def restrict(scope: Scope, hop: bool) -> Scope:
        definition = model.bundle.entities[scope.entity]
        fields = {}
        for name, info in scope.fields.items():
            f = definition.fields.get(name)
            if f is not None and (f.type == "related_to" or (hop and f.type == "formula")):
                info = dataclasses.replace(info, filterable=False)
            elif info.target is not None and not hop:
                info = dataclasses.replace(info, target=restrict(info.target, True))
            fields[name] = info
        return Scope(scope.entity, fields)

    found = restrict(entity.scope, False)
    with _FILTER_SCOPES_LOCK:
        _FILTER_SCOPES[entity] = found
    return found


#: Filters compiled without the request's context, per entity model and filter text.
_FILTERS = ContextFreeCache()


def _compile_filter(
    model: TenantModel, entity: EntityModel, text: str, ctx: EvalContext
) -> tuple[tuple[Node, ColumnElement[bool], str], bool]:
    """Return (a filter's tree, its SQL condition, its canonical text) and whether it is shared.

    The canonical text is what cursors are signed with.

    A list asks the same filter again and again: parsing, type checking and
    compiling are done once per published version, unless the condition holds
    the request's ``today()``, ``now()``, ``me()`` or ``my_team()``.
    """

    def build(watched: EvalContext) -> tuple[Node, ColumnElement[bool], str]:
        try:
            node = parsed(text)
            scope = _filter_scope(model, entity)
            check(node, scope, expect=ValueType.BOOLEAN)
            compiled = compile_sql(node, scope, column_resolver(model, entity, watched), watched)
        except ExpressionError as exc:
            raise QueryError(
                "invalid_filter", exc.message, "/filter", exc.line, exc.column
            ) from None
        return node, compiled, unparse(node)

    return _FILTERS.lookup(entity, text, build, ctx)


def _search_text(q: str | None) -> str | None:
    if q is None:
        return None
    if not isinstance(q, str):
        raise QueryError("invalid_search", "the search must be text", "/q")
    text = q.strip()
    if not text:
        return None
    if len(text) > MAX_SEARCH_LENGTH:
        raise QueryError(
            "invalid_search",
            f"the search is {len(text):,} characters long; the limit is {MAX_SEARCH_LENGTH}",
            "/q",
        )
    if any(ord(c) < 32 for c in text):
        raise QueryError("invalid_search", "the search must not hold control characters", "/q")
    return text


# -- sorting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SortKey:
    """One ORDER BY term and how to compare a row with a cursor on it."""

    name: str
    value: ColumnElement[Any]
    kind: ValueType
    descending: bool
    nullable: bool

    @property
    def ordered(self) -> ColumnElement[Any]:
        """The value as it sorts: text by code point."""
        return CodepointOrder(self.value) if self.kind is ValueType.TEXT else self.value

    def order_by(self) -> ColumnElement[Any]:
        term = self.ordered.desc() if self.descending else self.ordered.asc()
        if not self.nullable:
            return term
        return term.nulls_first() if self.descending else term.nulls_last()

    def bind(self, value: Any) -> ColumnElement[Any]:
        return sa.literal(value, self.value.type)

    @property
    def spec(self) -> str:
        return f"-{self.name}" if self.descending else self.name


#: Sort keys built without the request's context, per entity model and sort text.
_SORTS = ContextFreeCache()


def _sort_keys(
    model: TenantModel, entity: EntityModel, sort: str | None, ctx: EvalContext
) -> list[_SortKey]:
    if sort is not None and not isinstance(sort, str):
        raise QueryError("invalid_sort", "the sort must be text such as -amount,name", "/sort")
    text = sort if sort is not None and sort.strip() else DEFAULT_SORT
    if len(text) > MAX_SORT_LENGTH:
        raise QueryError("invalid_sort", "the sort is too long", "/sort")
    return _SORTS.get(entity, text, lambda watched: _parse_sort(model, entity, text, watched), ctx)


def _parse_sort(
    model: TenantModel, entity: EntityModel, text: str, ctx: EvalContext
) -> list[_SortKey]:
    keys: list[_SortKey] = []
    for part in text.split(","):
        item = part.strip()
        descending = item.startswith("-")
        name = item[1:].strip() if item[:1] in ("-", "+") else item
        if not name:
            raise QueryError(
                "invalid_sort",
                "the sort has an empty field: write fields like -amount,name",
                "/sort",
            )
        if any(k.name == name for k in keys):
            raise QueryError("invalid_sort", f"the sort names '{name}' twice", "/sort")
        keys.append(_sort_key(model, entity, name, descending, ctx))
    if len(keys) > MAX_SORT_KEYS:
        raise QueryError(
            "invalid_sort", f"a list can be sorted by at most {MAX_SORT_KEYS} fields", "/sort"
        )
    if keys[-1].name != "id":
        if any(k.name == "id" for k in keys):
            # Keys after a unique one never decide anything; they only cost.
            keys = keys[: next(i for i, k in enumerate(keys) if k.name == "id") + 1]
        else:
            keys.append(_sort_key(model, entity, "id", keys[-1].descending, ctx))
    return keys


def _sort_key(
    model: TenantModel, entity: EntityModel, name: str, descending: bool, ctx: EvalContext
) -> _SortKey:
    table = entity.table
    if name in SYSTEM_SORTS:
        column = table.c[name]
        return _SortKey(name, column, SYSTEM_SORTS[name], descending, bool(column.nullable))
    f = entity.field(name)
    info = entity.scope.fields.get(name)
    if f is None or info is None:
        raise QueryError(
            "invalid_sort",
            f"unknown field '{name}'{_suggest(name, entity, SYSTEM_SORTS)}",
            "/sort",
        )
    ft = fieldtypes.get(f.type)
    refused = QueryError(
        "invalid_sort",
        f"'{name}' is a {f.type.replace('_', ' ')} field and cannot be sorted",
        "/sort",
    )
    if not (ft.sortable and info.filterable) or info.type not in _VALUE_KINDS:
        raise refused
    if f.type == "formula":
        return _SortKey(
            name, formula_expression(model, entity, f, ctx), info.type, descending, True
        )
    if not ft.stored or ft.column_names(f) != [name]:
        raise refused
    column = table.c[name]
    return _SortKey(name, column, info.type, descending, bool(column.nullable))


def _suggest(name: str, entity: EntityModel, extra: Iterable[str]) -> str:
    options = [f.name for f in entity.entity.active_fields()] + list(extra)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _after(
    keys: Sequence[_SortKey],
    values: Sequence[Any],
    bound: Sequence[ColumnElement[Any] | None] | None = None,
) -> ColumnElement[bool]:
    """Return the condition "the row sorts strictly after these key values".

    ``bound`` gives each non-null value as the SQL to compare with (by default
    the value bound as a literal; :func:`_after_template` passes named
    parameters); the values themselves only say which are null.
    """
    if bound is None:
        bound = [None if v is None else k.bind(v) for k, v in zip(keys, values, strict=True)]
    directions = {k.descending for k in keys}
    if len(directions) == 1 and not any(
        k.nullable or v is None for k, v in zip(keys, values, strict=True)
    ):
        # One direction and no NULLs: a row-value comparison, as a person writes it,
        # which both databases match to an index on the leading key.
        left = sa.tuple_(*(k.ordered for k in keys))
        right = sa.tuple_(*bound)
        return left < right if keys[0].descending else left > right
    branches: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for key, value, sql in zip(keys, values, bound, strict=True):
        beyond = _beyond(key, value, sql)
        if beyond is not None:
            branches.append(sa.and_(*equal, beyond))
        equal.append(key.value.is_(None) if value is None else key.value == sql)
    condition = sa.or_(*branches) if branches else sa.false()
    leading = _leading_bound(keys[0], values[0], bound[0])
    return condition if leading is None else sa.and_(leading, condition)


def _beyond(key: _SortKey, value: Any, sql: Any) -> ColumnElement[bool] | None:
    """Rows after ``value`` (``sql``) on this key alone: NULLs last ascending, first descending."""
    if key.descending:
        return key.value.is_not(None) if value is None else key.ordered < sql
    if value is None:
        return None
    after = key.ordered > sql
    return sa.or_(after, key.value.is_(None)) if key.nullable else after


def _leading_bound(key: _SortKey, value: Any, sql: Any) -> ColumnElement[bool] | None:
    """A range on the first key alone, implied by the condition, that an index can seek to."""
    if key.descending:
        return None if value is None else key.ordered <= sql
    if value is None:
        return key.value.is_(None)
    return None if key.nullable else key.ordered >= sql


#: "After the cursor" with named parameters, per shared list shape and pattern of nulls.
_AFTER_TEMPLATES: weakref.WeakKeyDictionary[Any, dict[tuple[bool, ...], ColumnElement[bool]]] = (
    weakref.WeakKeyDictionary()
)
_AFTER_TEMPLATES_LOCK = threading.Lock()


def _after_template(
    shape: _Shape, keys: Sequence[_SortKey], values: Sequence[Any]
) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """Return :func:`_after` with the values as named parameters, and those parameters.

    The condition's shape depends only on which values are null, so for a shared
    list shape it is built once per such pattern and its SQL can be prepared once
    (``direct``) like a first page's.
    """
    pattern = tuple(v is None for v in values)
    with _AFTER_TEMPLATES_LOCK:
        found = _AFTER_TEMPLATES.get(shape.select, {}).get(pattern)
    if found is None:
        bound = [
            None if null else sa.bindparam(f"_after{i}", type_=k.value.type)
            for i, (k, null) in enumerate(zip(keys, pattern, strict=True))
        ]
        found = _after(keys, values, bound)
        with _AFTER_TEMPLATES_LOCK:
            _AFTER_TEMPLATES.setdefault(shape.select, {})[pattern] = found
    params = {f"_after{i}": v for i, v in enumerate(values) if v is not None}
    return found, params


# -- the list -----------------------------------------------------------------------------


def _list(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    request: ListRequest,
    ctx: EvalContext,
    secret: bytes,
    scope: ColumnElement[bool] | None,
    extra: ColumnElement[bool] | None,
    extra_key: str | None,
    embed_scope: EmbedScope | None = None,
) -> Page:
    limit = request.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(
            "invalid_limit", f"limit must be a whole number from 1 to {MAX_LIMIT}", "/limit"
        )
    fields = _chosen_fields(entity, request.fields)
    includes = _includes(model, entity, request.include)
    if fields is not None:
        # An included lookup is shown too: its id is what the embedded record hangs on.
        fields = tuple(dict.fromkeys((*fields, *includes)))
    keys = _sort_keys(model, entity, request.sort, ctx)
    where = _Where.build(
        connection,
        model,
        entity,
        request.filter,
        request.q,
        request.deleted,
        ctx,
        scope,
        extra,
        extra_key,
    )
    sort_spec = ",".join(k.spec for k in keys)
    after = None
    if request.cursor is not None:
        after = _cursor_values(request.cursor, secret, entity, sort_spec, where.digest, keys)

    dialect = connection.dialect
    shape, shared = _shape(model, entity, fields, request.sort, limit, ctx, dialect)
    prepared = None
    if shared and where.shared:
        # Every request of the published version asks this SQL: prepare it once.
        conditions, params = list(where.conditions), {}
        if after is not None:
            template, params = _after_template(shape, keys, after)
            conditions.append(template)
        prepared = _prepared_list(connection, shape, conditions, tuple(params))
    if prepared is not None:
        rows = _direct_rows(connection, prepared, where.node, params)
    else:
        conditions = list(where.conditions)
        if after is not None:
            conditions.append(_after(keys, after))
        rows = _execute(connection, shape.select.where(*conditions), where.node).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = rows_to_json(entity, shape.names, rows, dialect)
    attach_relations(connection, _with_links(entity, fields), items)
    for name in includes:
        _include(connection, model, entity, name, items, ctx, embed_scope)
    next_cursor = None
    if more and rows:
        last = rows[-1]
        values = tuple(typed(last[at]) for at, typed in shape.key_readers)
        position = cursors.Position(entity.name, sort_spec, where.digest, values)
        next_cursor = cursors.encode(position, secret)
    return Page(items, next_cursor)


@dataclass(frozen=True)
class _Shape:
    """A list's SELECT without its WHERE clause, and where its sort key values are."""

    select: sa.Select[Any]
    #: The select list's names, in order.
    names: tuple[str, ...]
    #: Per sort key: its position in a row, and how its raw value becomes a cursor value.
    key_readers: tuple[tuple[int, Callable[[Any], Any]], ...]


#: List shapes built without the request's context, per entity model.
_SHAPES = ContextFreeCache()
#: First pages of shared shapes and conditions compiled for the driver (see ``direct``).
_PREPARED_LISTS = direct.PreparedCache()


def _prepared_list(
    connection: Connection,
    shape: _Shape,
    conditions: Sequence[ColumnElement[bool]],
    supplied: tuple[str, ...],
) -> direct.Prepared | None:
    """Return a page's SELECT compiled once for this tenant, or None when it cannot be.

    Only for a shape and conditions every request shares: their identities are
    the key, and the entry keeps them alive so an ``id()`` cannot be reused.
    ``supplied`` names the parameters each request gives (a cursor's values).
    """
    dialect = connection.dialect
    schema = direct.schema_of(connection)
    key = (direct.dialect_key(dialect, schema), supplied, *map(id, conditions))
    kept = tuple(conditions)
    return _PREPARED_LISTS.get(
        shape.select,
        key,
        lambda: direct.prepare(shape.select.where(*kept), dialect, schema, supplied),
        keep=kept,
    )


def _shape(
    model: TenantModel,
    entity: EntityModel,
    fields: tuple[str, ...] | None,
    sort: str | None,
    limit: int,
    ctx: EvalContext,
    dialect: sa.Dialect,
) -> tuple[_Shape, bool]:
    """Return a list's SELECT with ORDER BY and LIMIT, where its sort keys are, and if shared.

    Built once per published version and (fields, sort, limit), unless a
    formula in the select list or the sort reads the request's context.
    """

    def build(watched: EvalContext) -> _Shape:
        keys = _sort_keys(model, entity, sort, watched)
        columns = cached_select_columns(model, entity, watched, fields, dialect)
        present = {getattr(c, "name", None) for c in columns}
        key_columns = []
        for i, key in enumerate(keys):
            if key.name in present:
                key_columns.append(key.name)
            else:
                columns.append(key.value.label(f"_sort{i}"))
                key_columns.append(f"_sort{i}")
        select = (
            sa.select(*columns)
            .order_by(*(k.order_by() for k in keys))
            .suffix_with(f"LIMIT {limit + 1}")
        )
        names = tuple(c.name for c in select.selected_columns)
        readers = tuple((names.index(c), typed_reader(entity, c, dialect)) for c in key_columns)
        return _Shape(select, names, readers)

    key = (fields, sort, limit, dialect.name, dialect.driver)
    return _SHAPES.lookup(entity, key, build, ctx)


def _cursor_values(
    token: str,
    secret: bytes,
    entity: EntityModel,
    sort_spec: str,
    digest: str,
    keys: Sequence[_SortKey],
) -> tuple[Any, ...]:
    def refuse(message: str) -> QueryError:
        return QueryError("invalid_cursor", message, "/cursor")

    if not isinstance(token, str):
        raise refuse("the cursor must be text")
    try:
        position = cursors.decode(token, secret)
    except cursors.CursorError as exc:
        raise refuse(f"this is not a valid cursor: {exc}") from None
    if position.entity != entity.name:
        raise refuse(f"this cursor belongs to a list of '{position.entity}'")
    if position.sort != sort_spec or position.digest != digest:
        raise refuse(
            "this cursor belongs to a list with another sort, filter or search: "
            "start again from the first page"
        )
    if not cursors.same_shape(position.values, [_VALUE_KINDS[k.kind] for k in keys]):
        raise refuse("this cursor no longer fits the list's fields: start again")
    return position.values


def _chosen_fields(entity: EntityModel, fields: Sequence[str] | None) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str) or not all(isinstance(name, str) for name in fields):
        raise QueryError("invalid_fields", "fields must be a list of field names", "/fields")
    for name in fields:
        if name not in SYSTEM_FIELDS and entity.field(name) is None:
            raise QueryError(
                "invalid_fields",
                f"unknown field '{name}'{_suggest(name, entity, SYSTEM_FIELDS)}",
                "/fields",
            )
    return tuple(dict.fromkeys(fields))


def _with_links(entity: EntityModel, fields: tuple[str, ...] | None) -> EntityModel:
    """The entity with only the many-to-many fields the page shows, so others cost no query."""
    if fields is None or all(name in fields for name in entity.links):
        return entity
    links = {name: link for name, link in entity.links.items() if name in fields}
    return dataclasses.replace(entity, links=links)


# -- include ------------------------------------------------------------------------------


def _includes(model: TenantModel, entity: EntityModel, include: Sequence[str]) -> list[str]:
    if isinstance(include, str) or not all(isinstance(name, str) for name in include):
        raise QueryError("invalid_include", "include must be a list of lookup fields", "/include")
    names = list(dict.fromkeys(include))
    for name in names:
        f = entity.field(name)
        if f is None:
            raise QueryError(
                "invalid_include",
                f"unknown field '{name}'{_suggest(name, entity, ())}",
                "/include",
            )
        if f.type != "lookup" or model.entity(f.get("target")) is None:
            raise QueryError(
                "invalid_include",
                f"'{name}' is not a lookup field, so there is no record to include",
                "/include",
            )
    return names


def _include(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    name: str,
    items: list[dict[str, Any]],
    ctx: EvalContext,
    embed_scope: EmbedScope | None = None,
) -> None:
    """Embed the targets of one lookup field under ``_included``: one query for the page."""
    f = entity.field(name)
    assert f is not None
    target = model.entity(f.get("target"))
    assert target is not None
    ids = {item[name] for item in items if item.get(name) is not None}
    found: dict[str, dict[str, Any]] = {}
    if ids:
        table = target.table
        dialect = connection.dialect
        query = sa.select(*cached_select_columns(model, target, ctx, None, dialect)).where(
            table.c.id.in_([uuid.UUID(i) for i in ids]), table.c.deleted_at.is_(None)
        )
        condition = embed_scope(target) if embed_scope is not None else None
        if condition is not None:
            query = query.where(condition)
        result = connection.execute(query)
        records = rows_to_json(target, list(result.keys()), result.all(), dialect)
        attach_relations(connection, target, records)
        found = {record["id"]: record for record in records}
    for item in items:
        pointer = item.get(name)
        item.setdefault(INCLUDED, {})[name] = None if pointer is None else found.get(pointer)


# -- execution ----------------------------------------------------------------------------


def _execute(
    connection: Connection, statement: sa.Executable, node: Node | None = None
) -> sa.CursorResult[Any]:
    """Run a statement; a filter too deeply nested for the database becomes a QueryError."""
    try:
        return connection.execute(statement)
    except DBAPIError as exc:
        refused = _query_error(connection, exc, node)
        if refused is None:
            raise
        raise refused from None


def _direct_rows(
    connection: Connection,
    prepared: direct.Prepared,
    node: Node | None,
    params: dict[str, Any] | None = None,
) -> list[Sequence[Any]]:
    """``_execute`` for a statement prepared for the driver: its rows, or the same errors."""
    try:
        return direct.rows(connection, prepared, params)
    except DBAPIError as exc:
        refused = _query_error(connection, exc, node)
        if refused is None:
            raise
        raise refused from None


def _query_error(connection: Connection, exc: DBAPIError, node: Node | None) -> QueryError | None:
    """Return the QueryError for a filter too deeply nested for the database, else None."""
    message = str(exc.orig).lower()
    too_complex = (
        any(s in message for s in _SQLITE_TOO_COMPLEX)
        if connection.dialect.name == "sqlite"
        else _PG_TOO_COMPLEX in message
    )
    if node is None or not too_complex:
        return None
    line, column = _deepest(node)
    return QueryError(
        "invalid_filter",
        "the filter is nested too deeply for the database: use fewer nested "
        "functions or parentheses",
        "/filter",
        line,
        column,
    )


def _deepest(root: Node) -> tuple[int, int]:
    """Return the position of the most deeply nested part of an expression."""
    best, best_depth = root, 0
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > best_depth and node.line:
            best, best_depth = node, depth
        stack.extend((child, depth + 1) for child in children(node))
    return best.line or 1, best.column or 1


@contextmanager
def _deadline(connection: Connection, timeout_ms: int) -> Iterator[None]:
    """Stop the statements run inside after ``timeout_ms``; QueryError ``count_timeout``.

    PostgreSQL: ``statement_timeout`` set locally inside a savepoint that is
    rolled back afterwards, which also undoes the setting. SQLite: a progress
    handler that interrupts the statement once the time is up.
    """
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 1:
        raise ValueError("timeout_ms must be a whole number >= 1")
    timed_out = QueryError(
        "count_timeout",
        f"counting took longer than {timeout_ms} ms; narrow the filter or use the estimate",
    )
    if connection.dialect.name == "sqlite":
        raw = connection.connection.dbapi_connection
        assert raw is not None
        deadline = time.monotonic() + timeout_ms / 1000

        def progress() -> int:
            return 1 if time.monotonic() > deadline else 0

        raw.set_progress_handler(progress, 10_000)
        try:
            yield
        except DBAPIError as exc:
            if "interrupted" in str(exc.orig).lower():
                raise timed_out from None
            raise
        finally:
            raw.set_progress_handler(None, 0)
        return
    savepoint = connection.begin_nested()
    try:
        connection.execute(
            sa.select(sa.func.set_config("statement_timeout", str(timeout_ms), True))
        )
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _PG_QUERY_CANCELED:
            savepoint.rollback()
            raise timed_out from None
        raise
    finally:
        if savepoint.is_active:
            savepoint.rollback()


class _Explain(sa.sql.expression.Executable, ClauseElement):
    """``EXPLAIN (FORMAT JSON)`` of a query, with the query's parameters bound as usual.

    Its cache key is the query's, so the EXPLAIN of a list's count is compiled
    once, like the count itself (compiling it each time cost ~0.3 ms of a count).
    """

    inherit_cache = True
    _traverse_internals = [("statement", InternalTraversal.dp_clauseelement)]

    def __init__(self, statement: sa.Select[Any]) -> None:
        self.statement = statement

    @property
    def _all_selected_columns(self) -> Any:
        # The compiled text's result map is the query's (compiled as the top statement);
        # a cached compile matches its columns against these.
        return self.statement._all_selected_columns


@compiles(_Explain, "postgresql")
def _explain(element: _Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + compiler.process(element.statement, **kw)
