"""The control database: what is global across tenants.

It holds the tenant registry (with each tenant's database URL, so a big tenant
can live on its own server), login identities, memberships and API tokens.
Tenant data never lives here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from uuid6 import uuid7

from metacrm.metadata.coltypes import JSONValue, UTCDateTime


def utcnow() -> dt.datetime:
    """Return the current time, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Base of the control database's own (fixed) tables."""

    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSONValue()}


class Tenant(Base):
    """A company using metacrm: a slug in URLs and a place where its tables live."""

    __tablename__ = "tenant"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    slug: Mapped[str] = mapped_column(sa.String(48), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    #: Where the tenant's tables live; a PostgreSQL schema name, or None for a SQLite file.
    database_url: Mapped[str] = mapped_column(sa.String(1000))
    schema: Mapped[str | None] = mapped_column(sa.String(63))
    template: Mapped[str] = mapped_column(sa.String(63))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class User(Base):
    """A login identity; one person may be a member of several tenants."""

    __tablename__ = "user_account"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    display_name: Mapped[str] = mapped_column(sa.String(200))
    password_hash: Mapped[str | None] = mapped_column(sa.String(200))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Team(Base):
    """A group of a tenant's members; teams nest, and a team sees its sub-teams' records."""

    __tablename__ = "team"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("tenant.id", ondelete="CASCADE"))
    #: API name of the team (the identifier grammar), stable; ``label`` is what people read.
    name: Mapped[str] = mapped_column(sa.String(63))
    label: Mapped[str] = mapped_column(sa.String(200))
    #: CASCADE only matters when the tenant goes: ``accounts.delete_team`` refuses a parent.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("team.id", ondelete="CASCADE")
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Membership(Base):
    """A user's place in one tenant: roles, team and manager (reports-to) there."""

    __tablename__ = "membership"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "user_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("tenant.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("user_account.id", ondelete="CASCADE"))
    roles: Mapped[list[str]] = mapped_column(JSONValue())
    team_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("team.id", ondelete="SET NULL"))
    #: The user this member reports to (approvals and escalations go there).
    manager_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("user_account.id", ondelete="SET NULL")
    )
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token for the API, stored as a hash; the secret is shown once."""

    __tablename__ = "api_token"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("tenant.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("user_account.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(100))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    read_only: Mapped[bool] = mapped_column(default=False)
    #: API names of the entities the token may touch; None means every entity.
    entities: Mapped[list[str] | None] = mapped_column(JSONValue())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class Invitation(Base):
    """A single-use, expiring link that lets a new member choose a password.

    Only the SHA-256 of the link's secret is stored, so a copy of the control
    database does not let anyone accept a pending invitation.
    """

    __tablename__ = "invitation"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("tenant.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("user_account.id", ondelete="CASCADE"))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[uuid.UUID | None]
    expires_at: Mapped[dt.datetime]
    accepted_at: Mapped[dt.datetime | None]


class PasswordReset(Base):
    """A single-use, expiring password-reset link sent by email (secret stored hashed)."""

    __tablename__ = "password_reset"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("user_account.id", ondelete="CASCADE"))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class Operator(Base):
    """A platform operator: runs the installation, creates tenants, is no tenant's member.

    Kept apart from ``User`` on purpose: no membership can ever be attached to an
    operator, so operator credentials open no tenant's records.
    """

    __tablename__ = "operator"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(200))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class OperatorSession(Base):
    """A server-side operator console session; the cookie holds a secret whose hash is here."""

    __tablename__ = "operator_session"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    operator_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("operator.id", ondelete="CASCADE"))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]


class LoginSession(Base):
    """A server-side login session; the browser's signed cookie holds only a random id.

    The row is keyed by the SHA-256 of that id, so a copy of the control
    database cannot be replayed as cookies. ``revoked_at`` ends it at once
    (logout, password or MFA change, deactivation); ``tenant_id`` is the
    tenant the person chose after signing in, and nothing else switches it.
    """

    __tablename__ = "login_session"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    secret_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("tenant.id", ondelete="CASCADE")
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ip: Mapped[str | None] = mapped_column(sa.String(45))
    user_agent: Mapped[str | None] = mapped_column(sa.String(300))
    #: The second factor was checked in this session (or the user has none to check).
    mfa_passed: Mapped[bool] = mapped_column(default=False)
    revoked_at: Mapped[dt.datetime | None]


class UserMfa(Base):
    """A user's TOTP second factor; the secret is encrypted with the platform key.

    ``last_step`` is the last accepted 30-second time step, so a code seen
    once (shoulder-surfed, phished, replayed) is refused afterwards.
    """

    __tablename__ = "user_mfa"

    user_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("user_account.id", ondelete="CASCADE"), primary_key=True
    )
    secret: Mapped[str] = mapped_column(sa.String(300))
    #: None while enrolment waits for the first code; MFA is on once confirmed.
    confirmed_at: Mapped[dt.datetime | None]
    last_step: Mapped[int | None] = mapped_column(sa.BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RecoveryCode(Base):
    """A single-use MFA recovery code, stored as a SHA-256 hash."""

    __tablename__ = "recovery_code"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    user_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    code_hash: Mapped[str] = mapped_column(sa.String(64))
    used_at: Mapped[dt.datetime | None]


class LoginThrottle(Base):
    """Failed sign-ins counted per account (``kind`` "account") and per IP ("ip").

    Kept in the control database so every web process sees the same counts;
    ``key`` is the normalised email or the IP address.
    """

    __tablename__ = "login_throttle"
    __table_args__ = (sa.UniqueConstraint("kind", "key"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    kind: Mapped[str] = mapped_column(sa.String(10))
    key: Mapped[str] = mapped_column(sa.String(254))
    failures: Mapped[int] = mapped_column(default=0)
    first_failure_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    locked_until: Mapped[dt.datetime | None]


class KnownIp(Base):
    """An address a user has signed in from; a new one raises an alert."""

    __tablename__ = "known_ip"
    __table_args__ = (sa.UniqueConstraint("user_id", "ip"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("user_account.id", ondelete="CASCADE"))
    ip: Mapped[str] = mapped_column(sa.String(45))
    first_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def teams_within(
    session: Session, tenant_id: uuid.UUID, team_id: uuid.UUID | None
) -> tuple[uuid.UUID, ...]:
    """Return ``team_id`` and every team nested below it, in one tenant.

    This is what the ``team`` scope and ``my_team()`` mean: a manager of a team
    sees its sub-teams' records too. A tenant's teams are few, so they are read
    at once and walked in memory; a parent cycle cannot loop.
    """
    if team_id is None:
        return ()
    children: dict[uuid.UUID, list[uuid.UUID]] = {}
    rows = session.execute(sa.select(Team.id, Team.parent_id).where(Team.tenant_id == tenant_id))
    for child, parent in rows:
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found: list[uuid.UUID] = []
    seen: set[uuid.UUID] = set()
    pending = [team_id]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        found.append(current)
        pending.extend(children.get(current, ()))
    return tuple(found)


def create_schema(engine: sa.Engine) -> None:
    """Create the control database's tables where they do not exist yet.

    Several workers may start at once on a fresh database (gunicorn --workers 4);
    on PostgreSQL an advisory lock makes them take turns instead of racing.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('metacrm.control'))"))
        Base.metadata.create_all(connection)
        _add_missing_columns(connection)


def _add_missing_columns(connection: sa.Connection) -> None:
    """Add the nullable columns a newer metacrm gave to tables an older one created.

    ``create_all`` only creates missing tables; without this, an instance made
    before e.g. ``api_token.entities`` existed would fail on every token. Only
    nullable columns are added (existing rows read NULL, no data changes);
    names come from the fixed ORM tables, never from input.
    """
    inspector = sa.inspect(connection)
    existing_tables = set(inspector.get_table_names())
    preparer = connection.dialect.identifier_preparer
    for table in Base.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable or column.primary_key:
                continue
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(
                f"ALTER TABLE {preparer.format_table(table)} "
                f"ADD COLUMN {preparer.format_column(column)} {kind}"
            )
