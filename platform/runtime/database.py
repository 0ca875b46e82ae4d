"""Engines and connections: one pooled engine per database URL, set up the same way.

SQLite needs care to behave like a real transactional database: pysqlite's
own transaction handling is switched off and ``BEGIN`` is emitted by us, so
DDL and SAVEPOINTs are transactional (SQLAlchemy's documented recipe);
foreign keys, WAL and a busy timeout are set on every connection; and the
functions the expression language needs are registered.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from metacrm.metadata.expression import register_sqlite_functions
from metacrm.runtime.changes import watch_writes

SQLITE_BUSY_TIMEOUT_MS = 5000
#: Engines kept open at once; beyond it the least recently used is disposed.
MAX_ENGINES = 64


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        register_sqlite_functions(dbapi_connection)

    @event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Engines:
    """A cache of engines keyed by URL, so tenants on one server share one pool.

    PostgreSQL tenants share a handful of URLs. Each SQLite tenant is a file with an
    engine of its own, so the cache keeps the most recently used ones and disposes
    the rest: a thousand tenants must not mean a thousand pools of open files.
    """

    def __init__(
        self, pool_size: int = 5, echo: bool = False, max_engines: int = MAX_ENGINES
    ) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._kept: set[str] = set()
        self._lock = threading.Lock()
        self._pool_size = pool_size
        self._echo = echo
        self._max_engines = max_engines

    def get(self, url: str) -> Engine:
        """Return the engine for ``url``, creating it on first use."""
        with self._lock:
            engine = self._engines.get(url)
            if engine is None:
                engine = create_engine(url, pool_size=self._pool_size, echo=self._echo)
                self._engines[url] = engine
                self._evict()
            else:
                self._engines.move_to_end(url)
            return engine

    def keep(self, url: str) -> Engine:
        """Return the engine for ``url`` and never evict it (the control database's).

        Its holder may then keep the engine itself instead of asking for it on
        every use, which an API request would otherwise do several times.
        """
        with self._lock:
            self._kept.add(url)
        return self.get(url)

    def _evict(self) -> None:
        """Dispose of the least recently used engines beyond the limit, except kept ones."""
        for url in list(self._engines):
            if len(self._engines) <= self._max_engines:
                return
            if url not in self._kept:
                # Connections checked out of an evicted engine stay valid; they are
                # closed when returned instead of going back to a pool.
                self._engines.pop(url).dispose()

    def dispose(self, engine: Engine | None = None) -> None:
        """Close the pooled connections of one engine, or of all, and forget them."""
        with self._lock:
            keys = [k for k, e in self._engines.items() if engine is None or e is engine]
            for key in keys:
                self._engines.pop(key).dispose()
                self._kept.discard(key)


def create_engine(url: str, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create an engine configured for metacrm (SQLite recipe, pool sizes)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, echo=echo)
        _setup_sqlite(engine)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"unsupported database {parsed.get_backend_name()!r}: use PostgreSQL or SQLite"
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # No pre-ping: it is a round trip on every checkout, and an API request checks out
    # twice (control and tenant). A connection that died with its server fails its
    # statement instead; SQLAlchemy then invalidates the whole pool, and the request is
    # answered 503 ``unavailable`` with Retry-After (decision record 0009).
    engine = sa.create_engine(
        parsed, echo=echo, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=False
    )
    watch_writes(engine)
    return engine


def for_reads(connection: sa.Connection, **options: Any) -> sa.Connection:
    """Return the connection set up for statements that only read and need no transaction.

    On PostgreSQL each statement then commits by itself: no BEGIN and ROLLBACK
    round trips, which a request that reads once would otherwise pay twice (the
    pool puts the connection's isolation back when it is returned). SQLite's
    deferred BEGIN happens in-process and costs nothing, so it stays. Never
    write through such a connection: nothing would make two writes atomic.
    ``options`` are further execution options, set in the same call.
    """
    if connection.dialect.name == "postgresql":
        options["isolation_level"] = "AUTOCOMMIT"
    return connection.execution_options(**options) if options else connection


def is_sqlite(bind: sa.Connection | Engine) -> bool:
    """Tell whether a connection or engine talks to SQLite."""
    return bind.dialect.name == "sqlite"


class _Kept:
    """A connection set up for reads, with the pool and process it was taken in."""

    __slots__ = ("connection", "pid", "pool")

    def __init__(self, connection: sa.Connection, pool: Any) -> None:
        self.connection = connection
        self.pool = pool
        self.pid = os.getpid()


class ReadConnections:
    """Connections kept checked out and set up for reads between requests (decision 0017).

    A request that only reads used to check a connection out of the pool, switch
    it to autocommit, and on return switch it back and roll back: on PostgreSQL
    that was about 70 µs of CPU on a read by id, a quarter of what the request
    costs besides its statement. Here a read borrows a connection that is
    already in autocommit and gives it back as it is.

    The idle connections of an engine are a stack (the most recently used, whose
    statements psycopg has prepared, goes out first), at most ``keep`` deep and
    never deeper than the pool's size, so writes always find connections;
    a borrow finds one or takes a new one from the pool, so nested or
    concurrent reads never share one. A connection is not kept when the block
    changed its execution options, left it invalidated or closed, or when its
    engine's pool was replaced since (``Engine.dispose`` after a lost server);
    disposing of the engine closes the idle ones. Only pools that hand
    connections between threads (``QueuePool``) keep any.
    """

    def __init__(self, keep: int = 5) -> None:
        self._idle: dict[Engine, list[_Kept]] = {}
        self._lock = threading.Lock()
        self._keep = keep

    @contextmanager
    def borrow(self, engine: Engine, **options: Any) -> Iterator[sa.Connection]:
        """Yield a connection for statements that only read (see ``for_reads``).

        ``options`` are further execution options (the schema map); a kept
        connection is given the ones the borrower asks for.
        """
        if not isinstance(engine.pool, QueuePool):
            with engine.connect() as connection:
                yield for_reads(connection, **options)
            return
        kept = self._take(engine)
        if kept is None:
            kept = _Kept(for_reads(engine.connect()), engine.pool)
        connection = kept.connection
        settled = connection.get_execution_options()
        if any(settled.get(name) != value for name, value in options.items()):
            connection.execution_options(**options)
            settled = connection.get_execution_options()
        try:
            yield connection
        finally:
            self._give_back(engine, kept, settled)

    def _take(self, engine: Engine) -> _Kept | None:
        with self._lock:
            idle = self._idle.get(engine)
            kept = idle.pop() if idle else None
        if kept is None:
            return None
        if kept.pool is engine.pool and not kept.connection.invalidated:
            return kept
        # The pool was replaced (a lost server): every connection kept from it is suspect.
        self._drop(engine)
        self._end(kept)
        return None

    def _give_back(self, engine: Engine, kept: _Kept, settled: Any) -> None:
        connection = kept.connection
        usable = (
            not connection.closed
            and not connection.invalidated
            and connection.get_execution_options() is settled
            and kept.pool is engine.pool
        )
        if usable and connection.in_transaction():
            # SQLite's reads run in a deferred transaction (one snapshot); PostgreSQL's
            # autocommit has none on the server, and this rollback sends nothing.
            try:
                connection.rollback()
            except sa.exc.DBAPIError:
                usable = False
        if not usable:
            if connection.invalidated:
                self._drop(engine)
            self._end(kept)
            return
        with self._lock:
            idle = self._idle.get(engine)
            if idle is None:
                idle = self._idle[engine] = []
                # Registered once per engine; a disposal pops the list, and the next
                # keep lands here again, hence the check.
                if not event.contains(engine, "engine_disposed", self._drop):
                    event.listen(engine, "engine_disposed", self._drop)
            keeping = len(idle) < min(self._keep, engine.pool.size())
            if keeping:
                idle.append(kept)
        if not keeping:
            connection.close()  # more idle than kept: back to the pool

    def _drop(self, engine: Engine) -> None:
        """End the idle connections of ``engine`` (disposed, or its server was lost)."""
        with self._lock:
            idle = self._idle.pop(engine, [])
        for kept in idle:
            self._end(kept)

    @staticmethod
    def _end(kept: _Kept) -> None:
        """Close a connection for good, not back into a pool that may be gone."""
        if kept.pid != os.getpid():
            return  # the parent's socket: closing it here would end the parent's session
        if not kept.connection.invalidated:
            kept.connection.invalidate()
        kept.connection.close()


#: The process's kept read connections, per engine.
READS = ReadConnections()
