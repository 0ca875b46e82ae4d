"""A tenant's versioned metadata: plan, publish, history, diff and rollback.

Publishing is one transaction that holds the version check, the data checks,
the DDL and the new version row; anything that fails leaves schema, data and
metadata exactly as they were, on both backends. ``expected_version`` makes two
admins' publishes conflict instead of overwriting each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from metacrm.metadata.model import Bundle, empty_bundle
from metacrm.metadata.plan import Plan, describe_change, make_plan
from metacrm.metadata.validation import BundleInvalid, Problem
from metacrm.runtime import audittrail
from metacrm.runtime.migrator import (
    CheckFailure,
    DataCheckFailed,
    PreparedPlan,
    apply_plan,
    check_plan,
    foreign_key_violations,
)
from metacrm.runtime.store import TenantStore, meta_version

LOCK_NOT_AVAILABLE = "55P03"
#: Version numbers are stored as 32-bit integers.
MAX_VERSION = 2**31 - 1
MAX_COMMENT = 1000


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as recorded with it."""

    user_id: uuid.UUID | None
    name: str


SYSTEM_ACTOR = Actor(None, "system")


@dataclass(frozen=True)
class Version:
    """One published version of a tenant's metadata."""

    version: int
    bundle: dict[str, Any]
    operations: list[dict[str, Any]]
    action: str
    comment: str
    created_at: dt.datetime | None
    created_by_name: str | None

    def summary(self) -> dict[str, Any]:
        """Return the version without its bundle, as history lists it."""
        return {
            "version": self.version,
            "action": self.action,
            "comment": self.comment,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "created_by": self.created_by_name,
            "operations": len(self.operations),
        }


class VersionConflict(Exception):
    """The bundle was planned against a version that is no longer the latest."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"expected version {expected}, but the published version is {current}")
        self.expected = expected
        self.current = current


class ConfirmationRequired(Exception):
    """The plan drops data and the caller did not confirm it."""

    def __init__(self, plan: Plan) -> None:
        super().__init__("the plan drops data; confirm the destructive operations to apply it")
        self.plan = plan


class UnknownVersion(LookupError):
    """A version number that was never published."""


class SchemaBusy(Exception):
    """The tables were locked by other work for longer than the lock timeout, every try."""


_NOTHING = Version(0, empty_bundle(), [], "none", "", None, None)


def _row_to_version(row: Any) -> Version:
    return Version(
        row.version,
        row.bundle,
        row.operations,
        row.action,
        row.comment,
        row.created_at,
        row.created_by_name,
    )


def current(connection: Connection) -> Version:
    """Return the latest published version (version 0, an empty bundle, before any)."""
    row = connection.execute(
        sa.select(meta_version).order_by(meta_version.c.version.desc()).limit(1)
    ).first()
    return _row_to_version(row) if row else _NOTHING


def get(connection: Connection, version: int) -> Version:
    """Return one published version; UnknownVersion when there is none."""
    if version == 0:
        return _NOTHING
    if not 0 < version <= MAX_VERSION:
        raise UnknownVersion(f"version {version} was never published")
    row = connection.execute(
        sa.select(meta_version).where(meta_version.c.version == version)
    ).first()
    if row is None:
        raise UnknownVersion(f"version {version} was never published")
    return _row_to_version(row)


def history(connection: Connection) -> list[Version]:
    """Return every published version, newest first."""
    rows = connection.execute(sa.select(meta_version).order_by(meta_version.c.version.desc()))
    return [_row_to_version(row) for row in rows]


def preview(
    connection: Connection, new_doc: Any, purge: Iterable[str] = ()
) -> tuple[Version, Plan, list[CheckFailure]]:
    """Plan a change against the published version and check it against the data."""
    head = current(connection)
    old = Bundle.from_doc(head.bundle)
    plan = make_plan(old, new_doc, purge)
    return head, plan, check_plan(connection, old, plan)


def diff(connection: Connection, a: int, b: int) -> Plan:
    """Return the operations that lead from version ``a`` to version ``b`` (either way)."""
    old, new = get(connection, a), get(connection, b)
    return describe_change(Bundle.from_doc(old.bundle), Bundle.from_doc(new.bundle), a <= b)


@contextmanager
def _publishing(store: TenantStore, lock_timeout_ms: int) -> Iterator[Connection]:
    """Yield a connection in a transaction fit for DDL on this backend."""
    with store.engine.connect() as raw:
        sqlite = store.dialect == "sqlite"
        if sqlite:
            # The copy-and-rename rebuild needs foreign keys off; SQLite ignores the
            # pragma inside a transaction, so it is set before BEGIN and restored after.
            raw.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            connection = raw.execution_options(
                schema_translate_map={None: store.schema}, sqlite_begin="IMMEDIATE"
            )
            with connection.begin():
                if not sqlite:
                    # Publishes of one tenant queue behind each other (no timeout); only
                    # the DDL waits briefly for tables that requests are reading. One
                    # round trip: the materialised CTE takes the lock before the outer
                    # SELECT sets the timeout (SET LOCAL, as set_config's is_local).
                    connection.execute(
                        sa.text(
                            "WITH locked AS MATERIALIZED "
                            "(SELECT pg_advisory_xact_lock(hashtext(:key))) "
                            "SELECT set_config('lock_timeout', :timeout, true) FROM locked"
                        ),
                        {
                            "key": f"metacrm.publish.{store.schema}",
                            "timeout": f"{int(lock_timeout_ms)}ms",
                        },
                    )
                yield connection
                violations = foreign_key_violations(connection)
                if violations:
                    raise BundleInvalid(
                        [
                            Problem(
                                "",
                                f"the change would leave {len(violations)} "
                                "broken reference(s) between records",
                            )
                        ]
                    )
        finally:
            if sqlite:
                raw.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def publish(
    store: TenantStore,
    new_doc: Any,
    *,
    expected_version: int,
    actor: Actor = SYSTEM_ACTOR,
    comment: str = "",
    confirm_destructive: bool = False,
    purge: Iterable[str] = (),
    action: str = "publish",
    lock_timeout_ms: int = 2000,
    attempts: int = 5,
    prepare: Callable[[Connection], None] | None = None,
    validated: bool = False,
    rollback_to: int | None = None,
    prepared: PreparedPlan | None = None,
    finish: Callable[[Connection], None] | None = None,
) -> Version:
    """Apply a new bundle as the next version, or raise and change nothing.

    On PostgreSQL the DDL waits at most ``lock_timeout_ms`` for busy tables and
    the whole transaction is retried, so a migration never queues behind a long
    query while blocking every request that arrives after it. ``prepare`` runs
    first inside the same transaction (tenant creation makes the namespace there,
    so a failed first publish leaves no schema behind on PostgreSQL). ``prepared``
    is the plan of ``new_doc`` from the empty bundle, built once for many tenants
    (creation from a template); it only applies as version 1. ``finish`` runs
    last inside the transaction, after the version is recorded (tenant creation
    registers the tenant there when its tables share the control database).
    """
    purge = list(purge)
    if prepared is not None and (expected_version != 0 or prepared.plan.result is not new_doc):
        raise ValueError("a prepared plan publishes its own bundle as version 1")
    if len(comment) > MAX_COMMENT:
        raise BundleInvalid(
            [Problem("/comment", f"is {len(comment)} characters long; the limit is {MAX_COMMENT}")]
        )
    for attempt in range(attempts):
        try:
            return _publish_once(
                store,
                new_doc,
                expected_version,
                actor,
                comment,
                confirm_destructive,
                purge,
                action,
                lock_timeout_ms,
                prepare,
                validated,
                rollback_to,
                prepared,
                finish,
            )
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            if code != LOCK_NOT_AVAILABLE:
                raise
            if attempt == attempts - 1:
                raise SchemaBusy(
                    f"tables stayed locked by other work through {attempts} tries"
                ) from exc
            time.sleep(0.05 * (2**attempt))
    raise AssertionError("unreachable")


def _publish_once(
    store: TenantStore,
    new_doc: Any,
    expected_version: int,
    actor: Actor,
    comment: str,
    confirm_destructive: bool,
    purge: list[str],
    action: str,
    lock_timeout_ms: int,
    prepare: Callable[[Connection], None] | None,
    validated: bool,
    rollback_to: int | None = None,
    prepared: PreparedPlan | None = None,
    finish: Callable[[Connection], None] | None = None,
) -> Version:
    with _publishing(store, lock_timeout_ms) as connection:
        if prepare is not None:
            prepare(connection)
        head = current(connection)
        if head.version != expected_version or not 0 <= expected_version < MAX_VERSION:
            raise VersionConflict(expected_version, head.version)
        old = Bundle.from_doc(head.bundle)
        if prepared is not None:
            plan = prepared.plan  # made from the empty bundle, which version 0 is
        else:
            plan = make_plan(old, new_doc, purge, validated=validated)
        if plan.empty and head.version:
            return head
        if plan.destructive and not confirm_destructive:
            raise ConfirmationRequired(plan)
        failures = check_plan(connection, old, plan)
        if failures:
            raise DataCheckFailed(failures)
        try:
            # A prepared plan only creates tables: no data the database could refuse,
            # so no savepoint (two round trips) around it.
            with connection.begin_nested() if prepared is None else contextlib.nullcontext():
                apply_plan(connection, store.schema, old, plan, prepared)
        except (IntegrityError, DataError) as exc:
            # The checks above name the rows for every refusal they know; this is the
            # backstop for the database finding one they missed.
            reason = str(exc.orig).splitlines()[0][:300]
            raise DataCheckFailed(
                [CheckFailure(-1, "", f"the database refused the change: {reason}", 0)]
            ) from None
        version = Version(
            head.version + 1,
            plan.result,
            prepared.operations
            if prepared is not None
            else [op.to_dict() for op in plan.operations],
            action,
            comment,
            dt.datetime.now(dt.UTC),
            actor.name,
        )
        try:
            connection.execute(
                meta_version.insert().values(
                    version=version.version,
                    bundle=version.bundle,
                    operations=version.operations,
                    action=action,
                    comment=comment,
                    created_at=version.created_at,
                    created_by=actor.user_id,
                    created_by_name=actor.name,
                )
            )
        except IntegrityError:
            raise VersionConflict(expected_version, head.version + 1) from None
        detail: dict[str, Any] = {
            "version": version.version,
            "previous_version": head.version,
            "comment": comment,
            "operations": len(version.operations),
        }
        if rollback_to is not None:
            detail["to_version"] = rollback_to
        audittrail.append(
            connection,
            action=f"meta.{action}",
            actor_id=actor.user_id,
            actor_name=actor.name,
            detail=detail,
            at=version.created_at,
        )
        if finish is not None:
            finish(connection)
        return version


def rollback(
    store: TenantStore,
    to_version: int,
    *,
    expected_version: int,
    actor: Actor = SYSTEM_ACTOR,
    comment: str = "",
    confirm_destructive: bool = False,
    lock_timeout_ms: int = 2000,
) -> Version:
    """Publish an earlier version's bundle as a new version, through the same planner."""
    with store.connect() as connection:
        target = get(connection, to_version)
    if to_version == 0:
        raise UnknownVersion("version 0 is the empty bundle; roll back to a published version")
    return publish(
        store,
        target.bundle,
        expected_version=expected_version,
        actor=actor,
        comment=comment or f"roll back to version {to_version}",
        confirm_destructive=confirm_destructive,
        action="rollback",
        lock_timeout_ms=lock_timeout_ms,
        rollback_to=to_version,
    )
