"""Tenants: create one from a template, list them, delete one with its data.

Creating a tenant makes its namespace (a PostgreSQL schema or a SQLite file),
publishes the template as metadata version 1 through the same planner every
later change goes through, and registers the tenant with its first admin.
Anything that fails undoes the namespace, so no half-made tenant remains; a
schema in the control database commits with the registration, in one
transaction. The template's plan and tables are built once per process.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from uuid6 import uuid7

from metacrm.metadata.identifiers import identifier_problem
from metacrm.metadata.loader import template_folder, validate_folder
from metacrm.metadata.model import Bundle, empty_bundle
from metacrm.metadata.plan import make_plan
from metacrm.metadata.validation import BundleInvalid
from metacrm.runtime import metastore
from metacrm.runtime.control import Membership, Tenant, User
from metacrm.runtime.migrator import PreparedPlan
from metacrm.runtime.passwords import generate_password, hash_password, password_problem
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore

MAX_SLUG = 40
#: SQLSTATE of CREATE SCHEMA for a name that is taken.
DUPLICATE_SCHEMA = "42P06"
_EXISTING_LOGIN = (
    "{email} already has a login; leave the password out to add them to this tenant "
    "with the password they have"
)
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,188}\.[^@\s]{1,63}", re.ASCII)


class TenantError(ValueError):
    """A tenant operation was refused; the message says why."""


@dataclass(frozen=True)
class CreatedTenant:
    """A new tenant, and the admin password when metacrm generated it."""

    tenant: Tenant
    admin: User | None
    generated_password: str | None


def slug_problem(slug: str) -> str | None:
    """Return why a tenant slug is refused, or None."""
    if len(slug) > MAX_SLUG:
        return f"is {len(slug)} characters long; the limit is {MAX_SLUG}"
    return identifier_problem(slug)


def email_problem(email: str) -> str | None:
    """Return why an email address is refused, or None."""
    if not _EMAIL.fullmatch(email):
        return f"{email!r} is not an email address"
    return None


@functools.cache
def _template(name: str) -> dict[str, Any]:
    try:
        folder = template_folder(name)
    except KeyError:
        raise TenantError(f"there is no template {name!r}") from None
    loaded, problems = validate_folder(folder)
    if problems:
        raise BundleInvalid(problems)
    return loaded.doc


def template_bundle(name: str) -> dict[str, Any]:
    """Return a fresh copy of a shipped template's bundle document."""
    return copy.deepcopy(_template(name))


@functools.cache
def _prepared(name: str) -> PreparedPlan:
    """Return the template's plan from the empty bundle, with its tables built once.

    It is the planner's own plan for the template, made once per process: every
    tenant created from the template gets the same one, and building it with its
    tables per tenant was most of the Python time of a creation. Nothing mutates it.
    """
    return PreparedPlan(make_plan(Bundle.from_doc(empty_bundle()), _template(name), validated=True))


def _placement(platform: Platform, slug: str) -> tuple[str, str | None]:
    settings = platform.settings
    url = settings.tenant_database_url or settings.database_url
    if sa.make_url(url).get_backend_name() == "sqlite":
        # A file name of its own per tenant, never reused: a process that still pools
        # connections to a deleted tenant's file can never serve it as a new tenant's.
        name = f"{slug}-{uuid7().hex[-12:]}.db"
        return f"sqlite:///{settings.tenants_dir / name}", None
    return url, f"{settings.tenant_schema_prefix}{slug}"


def _namespace_maker(platform: Platform, store: TenantStore) -> Callable[[Connection], None]:
    """Return the step that makes a tenant's namespace inside the first publish."""
    if store.schema is None:
        platform.settings.tenants_dir.mkdir(parents=True, exist_ok=True)
        path = store.engine.url.database
        try:
            # Claim the file atomically: of two creations racing, only one owns it.
            os.close(os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise TenantError(
                f"a database file for '{store.slug}' already exists at {path}"
            ) from None

    def make(connection: Connection) -> None:
        try:
            store.create_platform_tables(connection, create_schema=True)
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == DUPLICATE_SCHEMA:
                raise TenantError(f"the schema {store.schema} already exists") from None
            raise

    return make


def _drop_namespace(platform: Platform, store: TenantStore) -> None:
    if store.schema is None:
        path = store.engine.url.database
        platform.changes.forget(store.engine)
        platform.engines.dispose(store.engine)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        with store.engine.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


def create_tenant(
    platform: Platform,
    slug: str,
    name: str,
    template: str = "core",
    admin_email: str | None = None,
    admin_password: str | None = None,
) -> CreatedTenant:
    """Create a tenant from a template, with its first admin; raise TenantError when refused."""
    problem = slug_problem(slug)
    if problem:
        raise TenantError(f"tenant slug {slug!r} {problem}")
    if not 1 <= len(name.strip()) <= 200:
        raise TenantError("tenant name must be 1 to 200 characters long")
    if admin_email is not None and email_problem(admin_email):
        raise TenantError(email_problem(admin_email))
    if admin_password is not None and password_problem(admin_password, admin_email):
        raise TenantError(f"admin password {password_problem(admin_password, admin_email)}")
    prepared = _prepared(template)
    url, schema = _placement(platform, slug)
    with platform.session() as session:
        if platform.tenant(session, slug) is not None:
            raise TenantError(f"tenant '{slug}' already exists")
        if admin_email is not None and admin_password is not None:
            existing = session.scalar(sa.select(User).where(User.email == admin_email.lower()))
            if existing is not None:
                raise TenantError(_EXISTING_LOGIN.format(email=admin_email.lower()))
    store = TenantStore(slug, platform.engines.get(url), schema)
    make_namespace = _namespace_maker(platform, store)
    registered: list[tuple[Tenant, User | None, str | None]] = []

    def register(session: Session) -> None:
        tenant = Tenant(
            slug=slug, name=name.strip(), database_url=url, schema=schema, template=template
        )
        session.add(tenant)
        session.flush()
        admin, generated = None, None
        if admin_email is not None:
            admin, generated = _ensure_user(session, admin_email, admin_password)
            session.add(Membership(tenant_id=tenant.id, user_id=admin.id, roles=["admin"]))
            session.flush()
        registered[:] = [(tenant, admin, generated)]

    def register_with_tables(connection: Connection) -> None:
        # The control tables are not the tenant's: stop naming its schema (this is
        # the transaction's last step, so nothing after it needs the translation).
        connection.execution_options(schema_translate_map=None)
        with Session(bind=connection, expire_on_commit=False) as session:
            register(session)

    # A schema in the control database itself: schema, tables, version and
    # registration commit together (one transaction, nothing half-made if the
    # process dies between two commits, and one commit fewer).
    together = store.schema is not None and store.engine is platform.control_engine
    published = False
    try:
        metastore.publish(
            store,
            prepared.plan.result,
            expected_version=0,
            action="create",
            comment=f"created from template {template}",
            prepare=make_namespace,
            prepared=prepared,  # validated when the template was loaded (_template)
            finish=register_with_tables if together else None,
        )
        published = not together
        if not together:
            with platform.session() as session:
                register(session)
    except BaseException as exc:
        # On PostgreSQL a failed first publish rolled the schema back with it (and a
        # schema that existed before is not ours); the SQLite file is this call's own.
        if published or store.schema is None:
            _drop_namespace(platform, store)
        if isinstance(exc, sa.exc.DBAPIError):
            with platform.session() as session:
                if platform.tenant(session, slug) is not None:
                    # Another creation of the same slug won the race.
                    raise TenantError(f"tenant '{slug}' already exists") from None
        raise
    return CreatedTenant(*registered[0])


def _ensure_user(session: Session, email: str, password: str | None) -> tuple[User, str | None]:
    email = email.strip().lower()
    user = session.scalar(sa.select(User).where(User.email == email))
    if user is not None:
        if password is not None:
            raise TenantError(_EXISTING_LOGIN.format(email=email))
        return user, None
    generated = None
    if password is None:
        password = generated = generate_password()
    user = User(
        email=email, display_name=email.split("@")[0], password_hash=hash_password(password)
    )
    session.add(user)
    session.flush()
    return user, generated


def list_tenants(platform: Platform) -> list[Tenant]:
    """Return every tenant, oldest first."""
    with platform.session() as session:
        return list(session.scalars(sa.select(Tenant).order_by(Tenant.created_at)))


def delete_tenant(platform: Platform, slug: str) -> None:
    """Delete a tenant with all its data; TenantError when there is no such tenant."""
    with platform.session() as session:
        tenant = platform.tenant(session, slug)
        if tenant is None:
            raise TenantError(f"there is no tenant '{slug}'")
        store = platform.store(tenant)
        session.delete(tenant)
    _drop_namespace(platform, store)
