"""Run the hottest reads on the driver's cursor with SQL compiled once.

A read by id or a list's first page is the same SELECT again and again: once a
published version's statement is built (and cached, see ``contextfree``), the
SQL text, the order of its parameters and how each value is bound never change
for a tenant. SQLAlchemy still pays, on every execution, for the statement's
cache key, its compiled-cache lookup, the schema translation of the SQL text,
an execution context, the cursor's description and its result metadata: about
0.1 ms per statement on PostgreSQL, as much as the hand-written view's whole
query (decision record 0014).

``Prepared`` is that work done once per statement object, tenant schema and
dialect; ``rows`` sends it on the pooled connection's own cursor. What stays
SQLAlchemy's: the pool, the transaction (a read inside a write's transaction
sees its writes), ``before_cursor_execute``/``after_cursor_execute`` listeners
(called with no execution context, as for SQL sent as text), and errors, which
arrive wrapped as SQLAlchemy's ``DBAPIError`` classes with the connection
invalidated on a disconnect, so the API's 503 answers are unchanged.

Only statements that can be compiled to fixed SQL qualify: no expanding
``IN`` lists or literal-execute parameters (``prepare`` returns None and the
caller executes through SQLAlchemy as before).

``send`` puts a prepared statement on a cursor of its own without reading its
answer: a write's statements queued in a pipeline (:mod:`metacrm.runtime.pipeline`)
go this way, an INSERT or UPDATE compiled for the columns its parameters name,
as SQLAlchemy compiles it per set of keys.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

_Processor = Callable[[Any], Any]


@dataclass
class Prepared:
    """One statement compiled for one dialect and schema, with its bound values worked out."""

    sql: str
    #: Values of the parameters the statement carries itself, already bound.
    fixed: dict[str, Any]
    #: (name the caller gives, key in the driver's parameters, bind processor or None).
    supplied: tuple[tuple[str, str, _Processor | None], ...]
    #: For positional drivers (SQLite): the parameter keys in order; None for named ones.
    order: tuple[str, ...] | None
    #: The statement's columns' types, for the result processors found on first use.
    types: tuple[sa.types.TypeEngine[Any], ...]
    #: (column position, result processor), known after the first execution.
    results: tuple[tuple[int, _Processor], ...] | None = field(default=None)


def prepare(
    statement: sa.Executable,
    dialect: Dialect,
    schema: str | None,
    supplied: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> Prepared | None:
    """Compile ``statement`` once; None when it cannot be sent as fixed SQL.

    ``supplied`` names the bound parameters the caller gives on each run (the
    others carry their values in the statement). ``columns`` are the columns an
    INSERT or UPDATE sets from those parameters (SQLAlchemy's ``column_keys``).
    """
    options: dict[str, Any] = {"dialect": dialect}
    if columns is not None:
        options["column_keys"] = list(columns)
    if schema is not None:
        options.update(schema_translate_map={None: schema}, render_schema_translate=True)
    compiled = statement.compile(**options)  # type: ignore[attr-defined]
    if compiled.post_compile_params or compiled.literal_execute_params:
        return None
    positional = bool(compiled.positional)
    placeholders = {name: None for name in supplied}
    values = compiled.construct_params(placeholders, escape_names=not positional)
    escaped = compiled.escaped_bind_names or {}
    processors: dict[str, _Processor | None] = {}
    for name, bind in compiled.binds.items():
        key = name if positional else escaped.get(name, name)
        processors[key] = bind.type.dialect_impl(dialect).bind_processor(dialect)
    supplied_keys = {name: name if positional else escaped.get(name, name) for name in supplied}
    fixed = {}
    for key, value in values.items():
        if key in supplied_keys.values():
            continue
        process = processors.get(key)
        fixed[key] = process(value) if process is not None else value
    return Prepared(
        sql=compiled.string,
        fixed=fixed,
        supplied=tuple((n, k, processors.get(k)) for n, k in supplied_keys.items()),
        order=tuple(compiled.positiontup or ()) if positional else None,
        types=tuple(c.type for c in getattr(statement, "selected_columns", ())),
    )


def _arguments(prepared: Prepared, params: Mapping[str, Any] | None) -> Any:
    """The driver's parameters: the fixed values and the caller's, bound."""
    values = dict(prepared.fixed)
    for name, key, process in prepared.supplied:
        value = params[name] if params is not None else None
        values[key] = process(value) if process is not None else value
    return values if prepared.order is None else [values[k] for k in prepared.order]


def send(connection: Connection, prepared: Prepared, params: Mapping[str, Any] | None) -> Any:
    """Execute a prepared statement on a new driver cursor and return the cursor, unread.

    In psycopg's pipeline mode the statement is only queued; its answer (or its
    error) is read from the cursor when the pipeline ends.
    """
    arguments = _arguments(prepared, params)
    sql = prepared.sql
    dispatch = connection.dispatch
    raw = connection.connection
    cursor = raw.cursor()
    if dispatch.before_cursor_execute:
        dispatch.before_cursor_execute(connection, cursor, sql, arguments, None, False)
    try:
        cursor.execute(sql, arguments)
    except connection.dialect.loaded_dbapi.Error as exc:
        error = _wrapped(connection, raw, cursor, sql, arguments, exc)
        cursor.close()
        raise error from exc
    if dispatch.after_cursor_execute:
        dispatch.after_cursor_execute(connection, cursor, sql, arguments, None, False)
    return cursor


def rows(
    connection: Connection, prepared: Prepared, params: Mapping[str, Any] | None = None
) -> list[Sequence[Any]]:
    """Run a prepared SELECT on the connection's driver cursor and return all its rows."""
    arguments = _arguments(prepared, params)
    sql = prepared.sql
    dispatch = connection.dispatch
    raw = connection.connection
    cursor = raw.cursor()
    try:
        if dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(connection, cursor, sql, arguments, None, False)
        try:
            cursor.execute(sql, arguments)
            found = cursor.fetchall()
        except connection.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(connection, raw, cursor, sql, arguments, exc) from exc
        if dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(connection, cursor, sql, arguments, None, False)
        results = prepared.results
        if results is None:
            results = prepared.results = _result_processors(connection.dialect, prepared, cursor)
    finally:
        cursor.close()
    if not results:
        return found
    processed = []
    for row in found:
        listed = list(row)
        for at, process in results:
            listed[at] = process(listed[at])
        processed.append(listed)
    return processed


def _result_processors(
    dialect: Dialect, prepared: Prepared, cursor: Any
) -> tuple[tuple[int, _Processor], ...]:
    """How each column's driver value becomes what SQLAlchemy would have returned."""
    found = []
    for at, (column_type, described) in enumerate(
        zip(prepared.types, cursor.description, strict=True)
    ):
        process = column_type.dialect_impl(dialect).result_processor(dialect, described[1])
        if process is not None:
            found.append((at, process))
    return tuple(found)


def _wrapped(
    connection: Connection, raw: Any, cursor: Any, sql: str, arguments: Any, exc: Exception
) -> BaseException:
    """Wrap a driver error as SQLAlchemy would, invalidating the pool on a disconnect.

    SQLAlchemy, on a lost connection, invalidates the connection and every
    connection its pool handed out before (the server is likely gone for all of
    them); replacing the engine's pool does the same with public calls.
    """
    dialect = connection.dialect
    disconnect = dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
    if disconnect:
        connection.invalidate(exc)
        connection.engine.dispose(close=False)
    return sa.exc.DBAPIError.instance(
        sql,
        arguments,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=disconnect,
        dialect=dialect,
    )


class PreparedCache:
    """``Prepared`` statements per owner (held weakly) and key; None entries mean "cannot".

    The owner is a cached statement, or the cached part a statement is built
    from; its key must say everything else the SQL depends on (the schema, the
    dialect, the identity of the other parts). Each owner keeps at most
    ``limit`` entries. An entry also holds ``keep``: objects whose identity is
    part of its key stay alive as long as it does, so an ``id()`` in a key
    can never come to name another object.
    """

    def __init__(self, limit: int = 64) -> None:
        self._found: weakref.WeakKeyDictionary[Any, dict[Hashable, tuple[Any, Prepared | None]]]
        self._found = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._limit = limit

    def get(
        self,
        owner: Any,
        key: Hashable,
        build: Callable[[], Prepared | None],
        keep: Any = None,
    ) -> Prepared | None:
        """Return the prepared statement for (owner, key), preparing it on first use."""
        with self._lock:
            entry = self._found.get(owner, {}).get(key)
        if entry is not None:
            return entry[1]
        prepared = build()
        with self._lock:
            entries = self._found.setdefault(owner, {})
            if len(entries) >= self._limit:
                entries.clear()
            entries[key] = (keep, prepared)
        return prepared


def schema_of(connection: Connection) -> str | None:
    """The tenant schema a connection's statements are translated to (None on SQLite)."""
    translate = connection.get_execution_options().get("schema_translate_map")
    return None if not translate else translate.get(None)


def dialect_key(dialect: Dialect, schema: str | None) -> tuple[str, str, str | None]:
    """What prepared SQL depends on besides the statement: the dialect and the schema."""
    return (dialect.name, dialect.driver, schema)
