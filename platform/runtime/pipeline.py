"""Several statements in one round trip: psycopg's pipeline mode under SQLAlchemy.

A write of one record sends its row, its outbox event, its audit entry and the
read of what was stored; none of them needs another's answer before it is
sent. On PostgreSQL each statement executed through SQLAlchemy waits for its
answer before the next one goes, so the write cost a round trip per statement
(decision record 0016). Inside ``with pipelined(connection) as p``, statements
given to ``p.execute`` are compiled, bound and announced to event listeners by
SQLAlchemy as usual, but the driver only queues them; they are sent together
and their answers read when the block ends. A transaction's BEGIN is not
among them: psycopg sends it first and waits for its answer (a round trip of
its own) before it queues anything, so that it knows the transaction began.

Rows are read from the driver as they come, and only after the block: a
statement whose answer decides what to send next does not belong in a
pipeline. ``Pending.rows`` gives them as the driver does (select raw columns,
as ``recordview`` does); ``Pending.mappings`` runs the columns' result
processors, as SQLAlchemy's result would. An error of
any statement is raised when the block ends, translated by SQLAlchemy as any
statement's error would be (an IntegrityError stays one, a lost connection is
invalidated); the statements queued after it are not run. SQLite, in process,
runs each statement at once.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from metacrm.runtime import direct

#: Execution option naming the :class:`Pending` that receives a statement's driver cursor.
PIPELINED = "metacrm_pipelined"

_TUPLES_OK = 2  # psycopg.pq.ExecStatus.TUPLES_OK (psycopg is imported only on PostgreSQL)
_HOOKED: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()


class Pending:
    """A statement given to a pipeline; its rows are there once the pipeline has ended."""

    __slots__ = ("statement", "dialect", "cursor", "_answer", "_rows", "_typed")

    def __init__(self, statement: sa.Executable, dialect: sa.Dialect) -> None:
        self.statement = statement
        self.dialect = dialect
        self.cursor: Any = None
        self._answer: Any = None  # the driver's result (its column type ids)
        self._rows: list[Sequence[Any]] | None = None
        #: The rows as SQLAlchemy returned them (a statement run at once), else None.
        self._typed: list[sa.Row[Any]] | None = None

    def rows(self) -> list[Sequence[Any]]:
        """Return the statement's rows as the driver gave them (none for a plain write)."""
        if self._rows is None:
            raise RuntimeError("the pipeline has not ended yet")
        return self._rows

    def first(self) -> Sequence[Any] | None:
        """Return the first row, or None."""
        rows = self.rows()
        return rows[0] if rows else None

    def mappings(self) -> list[Mapping[str, Any]]:
        """Return the rows of a SELECT by column name, converted by the columns' types.

        What SQLAlchemy's result would give: each column's result processor
        (time zones, decimals, UUIDs on SQLite) runs on its value.
        """
        rows = self.rows()
        if self._typed is not None:
            return [row._mapping for row in self._typed]
        answer = self._answer
        if answer is None or not rows:
            return []
        oids = tuple(answer.ftype(i) for i in range(answer.nfields))
        columns = tuple(self.statement.selected_columns)  # type: ignore[attr-defined]
        names, processors = _processors(columns, self.dialect, oids)
        found = []
        for row in rows:
            found.append(
                {
                    name: value if process is None or value is None else process(value)
                    for name, process, value in zip(names, processors, row, strict=True)
                }
            )
        return found


@functools.lru_cache(maxsize=256)
def _processors(
    columns: tuple[Any, ...], dialect: sa.Dialect, oids: tuple[int, ...]
) -> tuple[tuple[str, ...], tuple[Callable[[Any], Any] | None, ...]]:
    """Return the names and result processors of selected columns (their driver type ids).

    Kept per column objects (a table's, for a row read): the key holds them, so
    an entry never stands for other columns that reuse an address.
    """
    names = tuple(column.key for column in columns)
    processors = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, oid)
        for column, oid in zip(columns, oids, strict=True)
    )
    return names, processors


class Pipeline:
    """Statements queued on one connection, sent together when the block ends."""

    def __init__(self, connection: Connection, queued: bool) -> None:
        self.connection = connection
        self.queued = queued
        self._pending: list[Pending] = []
        self._after: list[Callable[[], None]] = []

    def execute(
        self,
        statement: sa.Executable,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        reused: bool = False,
    ) -> Pending:
        """Queue a statement (run it at once on SQLite) and return its pending answer.

        ``reused`` says the same statement object serves many calls (it comes from
        a module's or a published version's cache): queued, it is then compiled
        once per schema and set of parameter names and sent on the driver's
        cursor (:func:`_prepared`). A statement built for one call goes through
        SQLAlchemy, whose cache recognises it by its structure.
        """
        pending = Pending(statement, self.connection.dialect)
        if not self.queued:
            result = self.connection.execute(statement, parameters)  # type: ignore[arg-type]
            pending._typed = list(result.all()) if result.returns_rows else []
            pending._rows = pending._typed
            return pending
        prepared = None
        if reused and (parameters is None or isinstance(parameters, Mapping)):
            prepared = _prepared(self.connection, statement, parameters)
        if prepared is not None:
            pending.cursor = direct.send(self.connection, prepared, parameters)
        else:
            self.connection.execute(
                statement,
                parameters,  # type: ignore[arg-type]
                execution_options={PIPELINED: pending},
            )
        self._pending.append(pending)
        return pending

    def then(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the answers are in (at once where nothing is queued)."""
        if self.queued:
            self._after.append(callback)
        else:
            callback()

    def _collect(self) -> None:
        for pending in self._pending:
            cursor = pending.cursor
            # The result's status, not ``description``, which builds a column object each.
            answer = cursor.pgresult
            returned = answer is not None and answer.status == _TUPLES_OK
            pending._rows = list(cursor.fetchall()) if returned else []
            pending._answer = answer
            cursor.close()
        for callback in self._after:
            callback()


#: Statements compiled once per schema and set of parameter names (``direct``).
_PREPARED = direct.PreparedCache()


def _prepared(
    connection: Connection, statement: sa.Executable, parameters: Mapping[str, Any] | None
) -> direct.Prepared | None:
    """The statement compiled for these parameters' names, or None where SQLAlchemy must run it.

    A queued statement's SQLAlchemy execution (its cache key, compiled-cache
    lookup, schema translation, execution context and parameter processing)
    cost about as much Python as psycopg's part of sending it; the statements
    of one write (its row, outbox event, audit entry and read back) are the
    same few shapes again and again.
    """
    names = tuple(sorted(parameters)) if parameters else ()
    schema = direct.schema_of(connection)
    key = (direct.dialect_key(connection.dialect, schema), names)
    columns = names if isinstance(statement, sa.Insert | sa.Update) else None
    return _PREPARED.get(
        statement,
        key,
        lambda: direct.prepare(statement, connection.dialect, schema, names, columns),
    )


def _queued(cursor: Any, context: Any, send: Callable[[Any], Any]) -> bool:
    """Send a pipelined statement on a cursor of its own, not waiting; False if not pipelined."""
    pending = context.execution_options.get(PIPELINED)
    if pending is None:
        return False
    own = cursor.connection.cursor()
    send(own)
    pending.cursor = own
    return True


def _queue(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """``do_execute``."""
    return _queued(cursor, context, lambda own: own.execute(statement, parameters))


def _queue_no_params(cursor: Any, statement: str, context: Any) -> bool:
    """``do_execute_no_params``."""
    return _queued(cursor, context, lambda own: own.execute(statement, None))


def _queue_many(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """``do_executemany``."""
    return _queued(cursor, context, lambda own: own.executemany(statement, parameters))


def _hook(engine: sa.Engine) -> None:
    """Let the engine's statements be queued (once per engine, on first use)."""
    if engine in _HOOKED:
        return
    with _HOOK_LOCK:
        if engine not in _HOOKED:
            event.listen(engine, "do_execute", _queue)
            event.listen(engine, "do_execute_no_params", _queue_no_params)
            event.listen(engine, "do_executemany", _queue_many)
            _HOOKED.add(engine)


@contextmanager
def pipelined(connection: Connection) -> Iterator[Pipeline]:
    """Yield a pipeline on the connection; its statements are sent when the block ends."""
    if connection.dialect.driver != "psycopg":
        yield Pipeline(connection, queued=False)
        return
    _hook(connection.engine)
    driver = connection.connection.driver_connection
    assert driver is not None
    queue = Pipeline(connection, queued=True)
    try:
        with driver.pipeline():
            yield queue
    except connection.dialect.loaded_dbapi.Error as exc:
        # An error of a queued statement shows when the answers are read: translate it
        # as SQLAlchemy translates any statement's error.
        connection._handle_dbapi_exception(exc, "(a pipelined statement)", None, None, None)
        raise  # not reached: the handler raises
    queue._collect()
