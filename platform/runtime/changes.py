"""Change watches: knowing, without a round trip, that a database has not changed.

Every API request needs two facts that almost never change: who its token
stands for (control database) and which metadata version its tenant has
published. Asking the database costs a round trip each, as much as the
request's own SQL (decision record 0010). A process may keep such facts in
memory if it learns of every change that could make them wrong. A *mark* is
what a watch says about a database at one moment; a cached fact is used only
while the mark taken now equals the mark taken before the fact was read. No
mark (``None``) means "unknown": read again, cache nothing.

- **SQLite**: ``PRAGMA data_version`` on a connection of the watch's own
  changes whenever any other connection (of this process or another) commits
  to the file. Exact and in-process, so every commit counts, whatever it wrote.
- **PostgreSQL**: a write to a watched table (``TOPIC_TABLES``) makes its
  transaction send ``NOTIFY metacrm_changes, '<topic>'`` before it commits;
  PostgreSQL delivers it at commit to every process's listening connection,
  whose thread counts the topic. The committing process counts it at once, so
  its own next request never sees the old fact; other processes see it as soon
  as the notification arrives (normally well under a millisecond). While the
  listening connection is down there are no marks; after it reconnects, every
  earlier mark is void, since notifications may have been missed.

Topics: ``control`` for the tables authentication reads; ``meta:<schema>``
for one tenant's published metadata versions.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Hashable
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event

CHANNEL = "metacrm_changes"
CONTROL = "control"
#: Tables whose changes each topic covers (the topic of ``_meta_version`` names its schema).
TOPIC_TABLES = {
    "tenant": CONTROL,
    "user_account": CONTROL,
    "membership": CONTROL,
    "api_token": CONTROL,
    "team": CONTROL,
    "_meta_version": "meta",
}
#: Execution option of a write that changes nothing a cache holds (a token's last use).
CACHE_NEUTRAL = "metacrm_cache_neutral"
_RAW_WRITE = re.compile(
    r"^\s*(?:insert\s+into|update|delete\s+from|truncate(?:\s+table)?)\s+"
    r'(?:"?[a-z0-9_]+"?\s*\.\s*)?"?([a-z0-9_]+)"?',
    re.IGNORECASE,
)
_serials = itertools.count(1)
#: libpq reports a missing database in its message only (no SQLSTATE before the session).
_NO_SUCH_DATABASE = re.compile(r'database ".*" does not exist')


def meta_topic(schema: str | None) -> str:
    """The topic of a tenant's published metadata (``meta:`` alone for a SQLite file)."""
    return f"meta:{schema or ''}"


class _Listener:
    """One PostgreSQL database's ``LISTEN`` connection and the counts of its topics."""

    RETRY_SECONDS = (0.1, 0.5, 1.0, 5.0)
    PROBE_SECONDS = 2.0

    def __init__(self, engine: sa.Engine) -> None:
        self._dialect = engine.dialect
        self._cargs, self._cparams = engine.dialect.create_connect_args(engine.url)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._epoch: int | None = None  # None while not listening
        self._serial = next(_serials)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metacrm-changes", daemon=True)
        self._thread.start()

    def mark(self, topic: str) -> Hashable | None:
        with self._lock:
            if self._epoch is None:
                return None
            return (self._serial, self._epoch, self._counts[topic])

    def touched(self, topic: str) -> None:
        with self._lock:
            self._counts[topic] += 1

    def stop(self) -> None:
        self._stopping.set()

    def _probe(self, listening: Any) -> bool:
        """Tell whether a notification sent on another connection reaches this one."""
        token = f"probe:{uuid.uuid4().hex}"
        sender = self._dialect.connect(*self._cargs, **self._cparams)
        try:
            sender.autocommit = True
            sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, token))
        finally:
            sender.close()
        deadline = time.monotonic() + self.PROBE_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            for notice in listening.notifies(timeout=left):
                if notice.payload == token:
                    return True
        return False

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                connection = self._dialect.connect(*self._cargs, **self._cparams)
            except Exception as exc:
                if _NO_SUCH_DATABASE.search(str(exc)):
                    return  # dropped: no mark can ever be given again
                failures += 1
                self._stopping.wait(self.RETRY_SECONDS[min(failures, 4) - 1])
                continue
            try:
                connection.autocommit = True
                connection.execute(f"LISTEN {CHANNEL}")
                if not self._probe(connection):
                    # Behind a transaction-pooling PgBouncer notifications do not arrive:
                    # give no marks (no caching) rather than marks that never change.
                    failures = len(self.RETRY_SECONDS)
                    continue
                failures = 0
                with self._lock:
                    # Notifications may have been missed while not listening.
                    self._epoch = next(_serials)
                while not self._stopping.is_set():
                    for notice in connection.notifies(timeout=1.0):
                        if not notice.payload.startswith("probe:"):
                            self.touched(notice.payload)
            except Exception:
                failures += 1
            finally:
                with self._lock:
                    self._epoch = None
                try:
                    connection.close()
                except Exception:  # the connection is gone already
                    pass
            self._stopping.wait(self.RETRY_SECONDS[min(max(failures, 1), 4) - 1])


class _DataVersion:
    """A SQLite file's ``PRAGMA data_version``, read on connections of the watch's own.

    The file is opened read-only, so a watch never creates a database, and it
    belongs to one engine: a tenant deleted and made again gets a new engine,
    hence a new watch whose marks match nothing cached before.

    ``data_version`` is per connection: it changes when another connection has
    committed since this one last asked. Each request asks (twice: the control
    database and its tenant's), and one shared connection behind a lock made
    the threads of a worker queue for it. So each asker borrows an idle
    connection (a new one when none is idle), and the mark is a generation
    shared by all of them, moved on whenever a connection sees its value change
    or looks for the first time. A commit that ended before a mark is asked for
    is seen by the connection asking (it last looked before the commit, or
    whoever looked since moved the generation on), so the mark differs from
    every mark given before the commit; a commit costs at most one extra move
    per idle connection, each a cache read again.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._idle: list[tuple[sqlite3.Connection, int]] = []
        self._generation = 0
        self._closed = False
        self._lock = threading.Lock()
        self._serial = next(_serials)

    def mark(self, topic: str) -> Hashable | None:
        with self._lock:
            connection, seen = self._idle.pop() if self._idle else (None, None)
        try:
            if connection is None:
                connection = sqlite3.connect(
                    f"file:{quote(self._path)}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                )
            (value,) = connection.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            if connection is not None:
                connection.close()
            return None
        with self._lock:
            if value != seen:
                self._generation += 1
            generation = self._generation
            if not self._closed:
                self._idle.append((connection, value))
                connection = None
        if connection is not None:
            connection.close()
        return (self._serial, generation)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()


#: PostgreSQL listeners are per process and per database: platforms on one URL share one,
#: counted, and the last platform to close stops it.
_listeners: dict[str, tuple[_Listener, int]] = {}
_listeners_lock = threading.Lock()
_keys: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()


def engine_key(engine: sa.Engine) -> str:
    """The engine's database URL as text, rendered once per engine.

    A key for caches per database: ``sa.URL`` hashes by rendering itself, which
    cost more than the rest of a cache hit on every request.
    """
    found = _keys.get(engine)
    if found is None:
        found = _keys[engine] = engine.url.render_as_string(hide_password=False)
    return found


def _acquire(engine: sa.Engine) -> _Listener:
    key = engine_key(engine)
    with _listeners_lock:
        found, users = _listeners.get(key, (None, 0))
        if found is None:
            found = _Listener(engine)
        _listeners[key] = (found, users + 1)
    return found


def _release(key: str) -> None:
    with _listeners_lock:
        found, users = _listeners.get(key, (None, 0))
        if found is None:
            return
        if users > 1:
            _listeners[key] = (found, users - 1)
            return
        del _listeners[key]
    found.stop()


def _running(engine: sa.Engine) -> _Listener | None:
    """The listener of an engine's database, if a platform of this process runs one."""
    found = _listeners.get(engine_key(engine))
    return found[0] if found is not None else None


def watch_writes(engine: sa.Engine) -> None:
    """Make a PostgreSQL engine announce its writes to watched tables (see the module).

    Each write is matched to its topic after it runs; the topics are announced
    with ``pg_notify`` just before the transaction commits, so a rolled-back
    write announces nothing, and counted at once in this process.
    """

    @event.listens_for(engine, "after_cursor_execute")
    def noted(
        connection: sa.Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        topic = _written_topic(connection, statement, context)
        if topic is not None:
            connection.info.setdefault("metacrm_topics", set()).add(topic)

    @event.listens_for(engine, "commit")
    def announce(connection: sa.Connection) -> None:
        if connection.invalidated:
            return  # the connection died: nothing is committed, nothing to announce
        topics = connection.info.pop("metacrm_topics", None)
        if not topics:
            return
        raw = connection.connection.dbapi_connection
        assert raw is not None
        listener = _running(engine)
        for topic in sorted(topics):
            raw.execute("SELECT pg_notify(%s, %s)", (CHANNEL, topic))
            if listener is not None:
                listener.touched(topic)

    @event.listens_for(engine, "rollback")
    def forget(connection: sa.Connection) -> None:
        if not connection.invalidated:  # an invalidated connection's notes went with it
            connection.info.pop("metacrm_topics", None)


def _written_topic(connection: sa.Connection, statement: str, context: Any) -> str | None:
    """The topic a statement's write falls under, or None (a read, or an unwatched table)."""
    options = connection.get_execution_options()
    if options.get(CACHE_NEUTRAL):
        return None
    table_name = None
    compiled = getattr(context, "compiled", None)
    if compiled is not None and (context.isinsert or context.isupdate or context.isdelete):
        table = getattr(compiled.statement, "table", None)
        table_name = getattr(table, "name", None)
    elif compiled is None or isinstance(compiled.statement, sa.TextClause):
        # SQL written as text (or sent to the driver as is): read its first words.
        match = _RAW_WRITE.match(statement)
        table_name = match.group(1).lower() if match else None
    topic = TOPIC_TABLES.get(table_name or "")
    if topic != "meta":
        return topic
    schema = (options.get("schema_translate_map") or {}).get(None)
    return meta_topic(schema)


class Watches:
    """The change watches of one platform: a mark per database and topic."""

    def __init__(self) -> None:
        self._sqlite: weakref.WeakKeyDictionary[sa.Engine, _DataVersion] = (
            weakref.WeakKeyDictionary()
        )
        self._listeners: dict[str, _Listener] = {}
        self._lock = threading.Lock()
        self._closed = False

    def mark(self, engine: sa.Engine, topic: str) -> Hashable | None:
        """What the database says now about ``topic``; None when nothing can be promised."""
        if self._closed:
            return None
        name = engine.dialect.name
        if name == "postgresql":
            return self._listener(engine).mark(topic)
        path = engine.url.database
        if name != "sqlite" or path in (None, "", ":memory:") or path.startswith("file:"):
            return None
        found = self._sqlite.get(engine)
        if found is None:
            with self._lock:
                found = self._sqlite.get(engine)
                if found is None:
                    found = self._sqlite[engine] = _DataVersion(path)
                    # Closed with its engine (``Engines`` keeps a bounded number of them).
                    weakref.finalize(engine, found.close)
        return found.mark(topic)

    def _listener(self, engine: sa.Engine) -> _Listener:
        key = engine_key(engine)
        found = self._listeners.get(key)
        if found is None:
            with self._lock:
                found = self._listeners.get(key)
                if found is None:
                    found = self._listeners[key] = _acquire(engine)
        return found

    def forget(self, engine: sa.Engine) -> None:
        """Close the watch of an engine being disposed (its file may be deleted next)."""
        with self._lock:
            found = self._sqlite.pop(engine, None)
        if found is not None:
            found.close()

    def close(self) -> None:
        """Close the SQLite watches and release the PostgreSQL listeners."""
        with self._lock:
            self._closed = True
            watches = list(self._sqlite.values())
            self._sqlite.clear()
            keys = list(self._listeners)
            self._listeners.clear()
        for watch in watches:
            watch.close()
        for key in keys:
            _release(key)
