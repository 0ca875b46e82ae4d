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
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("team.id", ondelete="RESTRICT")
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
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


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
