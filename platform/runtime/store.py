"""A tenant's own namespace: where its tables live and how to reach them.

On PostgreSQL the namespace is a schema, named in the SQL through SQLAlchemy's
``schema_translate_map`` (so pooled connections never depend on
``search_path``); on SQLite it is a file of its own. Platform tables inside the
namespace start with an underscore, which no metadata identifier can, so
they never collide with an entity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from metacrm.metadata.coltypes import JSONValue, UTCDateTime
from metacrm.metadata.tables import backend_indexes
from metacrm.runtime.database import READS

PLATFORM = sa.MetaData()

#: Every published metadata version of the tenant, kept forever.
meta_version = sa.Table(
    "_meta_version",
    PLATFORM,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("bundle", JSONValue(), nullable=False),
    sa.Column("operations", JSONValue(), nullable=False),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("comment", sa.String(1000), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("created_by", sa.Uuid(), nullable=True),
    sa.Column("created_by_name", sa.String(254), nullable=True),
)

#: Who did what, when, from where: record writes with old → new values, logins,
#: metadata publishes, exports, token and role events. Append-only and hash-chained
#: (see ``metacrm.runtime.audittrail``): ``seq`` is the storage order, ``prev_hash``
#: links each entry to the one before it.
audit = sa.Table(
    "_audit",
    PLATFORM,
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("id", sa.Uuid(), nullable=False, unique=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("actor_id", sa.Uuid(), nullable=True),
    sa.Column("actor_name", sa.String(254), nullable=True),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("entity", sa.String(63), nullable=True),
    sa.Column("record_id", sa.Uuid(), nullable=True),
    sa.Column("changes", JSONValue(), nullable=True),
    sa.Column("detail", JSONValue(), nullable=True),
    sa.Column("ip", sa.String(45), nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix__audit__record", "entity", "record_id", "seq"),
    sa.Index("ix__audit__at", "at", "seq"),
    sa.Index("ix__audit__actor", "actor_id", "seq"),
    sa.Index("ix__audit__action", "action", "seq"),
)

#: The end of the audit chain (one row): the last ``seq`` and its hash. Appends
#: update it first, which serialises them per tenant (a row lock on PostgreSQL,
#: the write lock on SQLite) so the chain never forks.
audit_head = sa.Table(
    "_audit_head",
    PLATFORM,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

#: In-app notifications: to one member (``user_id``) or to every member whose
#: roles hold a capability (``capability``, e.g. ``manage_users`` for admins).
notification = sa.Table(
    "_notification",
    PLATFORM,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("user_id", sa.Uuid(), nullable=True),
    sa.Column("capability", sa.String(63), nullable=True),
    sa.Column("kind", sa.String(63), nullable=False),
    sa.Column("message", JSONValue(), nullable=False),
    sa.Column("link", sa.String(2000), nullable=True),
    sa.CheckConstraint(
        "(user_id IS NULL) <> (capability IS NULL)", name="ck__notification__audience"
    ),
    sa.Index("ix__notification__user", "user_id", "id"),
    sa.Index("ix__notification__capability", "capability", "id"),
)

#: When a member read a notification (one row per member and notification).
notification_read = sa.Table(
    "_notification_read",
    PLATFORM,
    sa.Column("notification_id", sa.Uuid(), primary_key=True),
    sa.Column("user_id", sa.Uuid(), primary_key=True),
    sa.Column("read_at", UTCDateTime(), nullable=False),
)

#: Events for automation, committed with the change that caused them (transactional outbox).
outbox = sa.Table(
    "_outbox",
    PLATFORM,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("entity", sa.String(63), nullable=False),
    sa.Column("record_id", sa.Uuid(), nullable=True),
    sa.Column("actor_id", sa.Uuid(), nullable=True),
    sa.Column("payload", JSONValue(), nullable=False),
    sa.Column("depth", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("dispatched_at", UTCDateTime(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Index("ix__outbox__pending", "dispatched_at", "id"),
)

#: Counters of auto-number fields, one row per field, advanced under a row lock.
sequence = sa.Table(
    "_sequence",
    PLATFORM,
    sa.Column("name", sa.String(130), primary_key=True),
    sa.Column("value", sa.BigInteger(), nullable=False),
)

#: First answers to POSTs carrying an Idempotency-Key, replayed to retries.
idempotency = sa.Table(
    "_idempotency",
    PLATFORM,
    sa.Column("principal_id", sa.Uuid(), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("body", JSONValue(), nullable=False),
    sa.Column("headers", JSONValue(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)


#: Key of ``MetaData.info`` that marks tables which never change once built (the
#: platform's own, a prepared template's): the DDL compiled from them is kept there,
#: per dialect and table set, and only the schema name is rendered per namespace.
DDL_CACHE = "metacrm.ddl_cache"
PLATFORM.info[DDL_CACHE] = {}
#: Any schema name: compiled DDL holds a placeholder token instead of the name.
_PLACEHOLDER_SCHEMA = "placeholder"


def _compile_ddl(dialect: sa.Dialect, metadata: sa.MetaData, tables: list[sa.Table]) -> list[str]:
    """Compile CREATE TABLE and CREATE INDEX of ``tables``, schema left as a placeholder.

    Tables come in foreign-key order and each table's indexes by name, so the same
    tables always give the same text. The schema is compiled as SQLAlchemy's own
    ``schema_translate_map`` placeholder, which ``_render_schema`` fills in.
    """
    wanted = set(tables)
    statements: list[sa.schema.ExecutableDDLElement] = []
    for table in metadata.sorted_tables:
        if table in wanted:
            statements.append(CreateTable(table))
            indexes = backend_indexes(table, dialect.name)
            statements.extend(CreateIndex(index) for index in indexes)
    translate = {None: _PLACEHOLDER_SCHEMA}
    return [
        str(s.compile(dialect=dialect, schema_translate_map=translate)).strip() for s in statements
    ]


def _render_schema(dialect: sa.Dialect, statements: list[str], schema: str | None) -> list[str]:
    """Put ``schema`` into compiled statements exactly as a compile for it would.

    This is the step ``compile(..., render_schema_translate=True)`` runs after
    compiling; the names are quoted by the dialect's own rules.
    """
    translate = {None: schema}
    preparer = dialect.identifier_preparer._with_schema_translate(translate)
    return [preparer._render_schema_translates(s, dict(translate)) for s in statements]


def table_ddl(
    dialect: sa.Dialect, metadata: sa.MetaData, tables: list[sa.Table], schema: str | None
) -> list[str]:
    """Return the statements that create ``tables`` with their indexes in ``schema``, in order.

    Compiling the DDL of a template's tables costs milliseconds of Python per
    tenant; for metadata marked with ``DDL_CACHE`` it is compiled once per process.
    """
    cache = metadata.info.get(DDL_CACHE)
    key = (dialect.name, dialect.server_version_info, frozenset(t.name for t in tables))
    compiled = cache.get(key) if cache is not None else None
    if compiled is None:
        compiled = _compile_ddl(dialect, metadata, tables)
        if cache is not None:
            cache[key] = compiled
    return _render_schema(dialect, compiled, schema)


def run_ddl(connection: Connection, statements: list[str]) -> None:
    """Run DDL statements in order, in one round trip where the driver allows it.

    On PostgreSQL the statements go as one batch: a tenant's first publish creates
    dozens of tables and indexes, and one round trip instead of one per statement
    is most of what separates it from hand-written DDL. SQLite's driver runs one
    statement per call, in process, so there a call each costs nothing extra.
    """
    if not statements:
        return
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(";\n".join(statements))
        return
    for statement in statements:
        connection.exec_driver_sql(statement)


APPEND_ONLY = "the audit trail is append-only"


def audit_guard_ddl(dialect: str, schema: str | None) -> list[str]:
    """Return the statements that make ``_audit`` refuse UPDATE, DELETE (and TRUNCATE).

    metacrm never changes an entry; the database refusing it too means no bug
    and no stray SQL can either. Someone with the rights to drop the trigger
    still can, which ``metacrm audit verify`` detects. The statements are
    idempotent (new namespaces and upgrades run the same ones) and also create
    the chain's head row.
    """
    zeros = "0" * 64
    if dialect == "postgresql":
        prefix = f'"{schema}".' if schema else ""
        return [
            f"CREATE OR REPLACE FUNCTION {prefix}_audit_append_only() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION '{APPEND_ONLY}' "
            "USING ERRCODE = '42501'; END$$",
            f"DROP TRIGGER IF EXISTS _audit_append_only ON {prefix}_audit",
            "CREATE TRIGGER _audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON "
            f"{prefix}_audit FOR EACH STATEMENT EXECUTE FUNCTION {prefix}_audit_append_only()",
            f"INSERT INTO {prefix}_audit_head (id, seq, hash) VALUES (1, 0, '{zeros}') "
            "ON CONFLICT DO NOTHING",
            # An import batch's entry holds ~100 kB of JSON: lz4 compresses it several
            # times faster than the default pglz (decision record 0015), where the
            # server was built with it. Only values written from now on are affected.
            "DO $$BEGIN IF EXISTS (SELECT 1 FROM pg_settings WHERE name = "
            "'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN "
            f"ALTER TABLE {prefix}_audit ALTER COLUMN changes SET COMPRESSION lz4; "
            "END IF; END$$",
        ]
    return [
        f"CREATE TRIGGER IF NOT EXISTS _audit_no_{verb.lower()} BEFORE {verb} ON _audit "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
        for verb in ("UPDATE", "DELETE")
    ] + [f"INSERT INTO _audit_head (id, seq, hash) VALUES (1, 0, '{zeros}') ON CONFLICT DO NOTHING"]


@dataclass(frozen=True)
class TenantStore:
    """The connection details of one tenant's namespace."""

    slug: str
    engine: Engine
    schema: str | None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _translation(self) -> dict[str, Any]:
        """The execution options that name this tenant's schema in every statement."""
        if self.schema is None:
            # A SQLite file is its own namespace; a map to None would only make every
            # statement pay a pass that writes "main." before each table name.
            return {}
        return {"schema_translate_map": {None: self.schema}}

    def _options(self, connection: Connection) -> Connection:
        options = self._translation()
        return connection.execution_options(**options) if options else connection

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """Yield a connection that names this tenant's schema in every statement."""
        with self.engine.connect() as connection:
            yield self._options(connection)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Yield a connection for a request that only reads (see ``database.for_reads``).

        It is borrowed from ``database.READS``: kept set up between requests.
        """
        with READS.borrow(self.engine, **self._translation()) as connection:
            yield connection

    @contextmanager
    def begin(self, immediate: bool = False) -> Iterator[Connection]:
        """Yield a connection inside one transaction, committed when the block ends.

        ``immediate`` takes SQLite's write lock at BEGIN, so a read-then-write
        transaction cannot fail half-way on a lock upgrade.
        """
        with self.engine.connect() as connection:
            if immediate:
                connection = connection.execution_options(sqlite_begin="IMMEDIATE")
            connection = self._options(connection)
            with connection.begin():
                yield connection

    def create_platform_tables(self, connection: Connection, create_schema: bool = False) -> None:
        """Create the platform's own tables in a new namespace.

        ``create_schema`` makes the PostgreSQL schema first, in the same batch.
        """
        statements = table_ddl(connection.dialect, PLATFORM, PLATFORM.sorted_tables, self.schema)
        if create_schema and self.schema is not None:
            statements.insert(0, f'CREATE SCHEMA "{self.schema}"')
        statements += audit_guard_ddl(connection.dialect.name, self.schema)
        run_ddl(connection, statements)

    def upgrade_platform_tables(self) -> None:
        """Add platform tables that a newer metacrm needs to an existing namespace."""
        with self.begin() as connection:
            PLATFORM.create_all(connection, checkfirst=True)
            run_ddl(connection, audit_guard_ddl(connection.dialect.name, self.schema))
